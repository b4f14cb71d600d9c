"""Human labels from the review screen (table ``labels``): submit, undo, look-ups.

Labels are append-only: an undo appends a ``kind='undo'`` row; the latest row per (round, prompt,
annotator) counts. A label that arrives after the round's pairs were frozen is kept. Each write also
updates the annotator's claim (``storage.claims``) and the audit log, in ONE transaction retried on
conflicts. (Bulk-imported labels go through ``storage.prompts.insert_labels``.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta

import duckdb

from storage import audit, claims
from storage.db import fetch_one, run_in_transaction

LABEL_RETRIES = 10
"""Attempts of a label write that collides with a concurrent claim or label."""


@dataclass(frozen=True)
class Decision:
    """What an annotator decided about one prompt: a pair, a ranking (best first), all bad, or a skip."""

    chosen_id: str | None = None
    rejected_id: str | None = None
    ranking: tuple[str, ...] | None = None
    all_bad: bool = False
    skipped_reason: str | None = None
    comment: str | None = None
    active_seconds: float | None = None

    @property
    def kind(self) -> str:
        return ("skip" if self.skipped_reason else "all_bad" if self.all_bad else
                "ranking" if self.ranking else "pair")


def submit_label(cur: duckdb.DuckDBPyConnection, *, round_id: int, prompt_id: str, annotator: str,
                 decision: Decision, overlap: int, now: datetime, claim_minutes: float = 15.0) -> dict:
    """Append one human label, close the annotator's claim and write the audit row, in ONE transaction.

    A decision marks the claim ``done``; a skip frees its place. A label whose claim had expired and
    was taken over is still kept (``held_claim`` False). Returns {label_id, held_claim}.
    """
    ranking = json.dumps(list(decision.ranking)) if decision.ranking else None
    expires = now + timedelta(minutes=claim_minutes)

    def work() -> dict:
        label_id = cur.execute(
            """INSERT INTO labels (prompt_id, round_id, annotator, source, kind, chosen_id, rejected_id, ranking,
                                   all_bad, skipped_reason, comment, active_seconds)
               VALUES (?, ?, ?, 'human', 'label', ?, ?, ?, ?, ?, ?, ?) RETURNING label_id""",
            [prompt_id, round_id, annotator, decision.chosen_id, decision.rejected_id, ranking, decision.all_bad,
             decision.skipped_reason, decision.comment, decision.active_seconds]).fetchone()[0]
        if decision.kind == "skip":
            claims.skip_claim(cur, round_id, prompt_id, annotator, now)
            held = True
        else:
            held = claims.close_claim(cur, round_id, prompt_id, annotator)
            held = held or claims.try_claim(cur, round_id, prompt_id, annotator, overlap, now, expires, status="done")
        audit.record(cur, annotator, "label", {"label_id": label_id, "round_id": round_id, "prompt_id": prompt_id,
                                                "kind": decision.kind, "chosen_id": decision.chosen_id,
                                                "rejected_id": decision.rejected_id, "held_claim": held})
        return {"label_id": label_id, "held_claim": held}

    return run_in_transaction(cur, work, retries=LABEL_RETRIES)


def get_label(cur: duckdb.DuckDBPyConnection, label_id: int) -> dict | None:
    return fetch_one(cur, "SELECT * FROM labels WHERE label_id = ?", [label_id])


def latest_label(cur: duckdb.DuckDBPyConnection, round_id: int, prompt_id: str, annotator: str) -> dict | None:
    """The row that counts for (round, prompt, annotator): the newest, a label or an undo."""
    return fetch_one(cur, "SELECT * FROM labels WHERE round_id = ? AND prompt_id = ? AND annotator = ? "
                          "ORDER BY label_id DESC LIMIT 1", [round_id, prompt_id, annotator])


class UndoRefused(ValueError):
    """The label cannot be undone (not yours, already undone, or superseded)."""


def undo_label(cur: duckdb.DuckDBPyConnection, label_id: int, annotator: str, *, overlap: int, now: datetime,
               claim_minutes: float = 15.0) -> dict:
    """Append an ``undo`` row for the annotator's label and give them its prompt back (a live claim).

    Nothing in ``labels`` is updated in place. Returns {undo_id, round_id, prompt_id, held_claim}.
    """
    row = get_label(cur, label_id)
    if row is None or row["annotator"] != annotator or row["kind"] != "label":
        raise UndoRefused(f"label {label_id} is not one of your labels")
    latest = latest_label(cur, row["round_id"], row["prompt_id"], annotator)
    if latest is None or latest["label_id"] != label_id:
        raise UndoRefused(f"label {label_id} was already undone or replaced by a newer one")
    rid, pid = row["round_id"], row["prompt_id"]
    expires = now + timedelta(minutes=claim_minutes)

    def work() -> dict:
        undo_id = cur.execute("INSERT INTO labels (prompt_id, round_id, annotator, source, kind) "
                              "VALUES (?, ?, ?, 'human', 'undo') RETURNING label_id", [pid, rid, annotator]).fetchone()[0]
        held = (claims.reopen_claim(cur, rid, pid, annotator, now, expires)
                or claims.try_claim(cur, rid, pid, annotator, overlap, now, expires))
        audit.record(cur, annotator, "undo", {"label_id": label_id, "undo_id": undo_id, "round_id": rid,
                                               "prompt_id": pid, "held_claim": held})
        return {"undo_id": undo_id, "round_id": rid, "prompt_id": pid, "held_claim": held}

    return run_in_transaction(cur, work, retries=LABEL_RETRIES)
