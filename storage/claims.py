"""Review claims (table ``review_claims``): who has or had a prompt of a round.

Claims are the authority on who has or had a prompt. A (round, prompt) has ``overlap`` slots (primary
key round, prompt, slot) and an annotator holds at most one row (unique round, prompt, annotator):
with overlap 1 two annotators never hold the same prompt, and nobody gets a prompt twice. A live claim
expires after ``claim_minutes`` and its slot is taken over by the next annotator; a submitted one is
``done`` and keeps its slot; a skip moves to a negative slot (``skipped``), freeing the place for
someone else. A race shows up in DuckDB as a transaction conflict or a constraint violation
(``storage.db.CONFLICTS``), at write or commit time; both are retried.

Functions documented "inside the caller's transaction" are the building blocks of ``storage.labels``.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import duckdb

from storage.db import CONFLICTS, fetch_all, fetch_one, run_in_transaction, scalar

CLAIM_RETRIES = 5
"""Attempts of a claim that collides with a concurrent one before giving up (the caller tries the next prompt)."""

_CLAIM_COLS = "round_id, prompt_id, slot, annotator, status, claimed_at, expires_at"


def claim_rows(cur: duckdb.DuckDBPyConnection, round_id: int, prompt_ids: list[str]) -> dict[str, list[dict]]:
    """{prompt_id: its claim rows} for the given prompts of a round (prompts without claims are absent)."""
    rows = fetch_all(cur, f"SELECT {_CLAIM_COLS} FROM review_claims WHERE round_id = ? "
                          "AND prompt_id IN (SELECT unnest(?))", [round_id, prompt_ids])
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["prompt_id"], []).append(r)
    return out


def holds_place(r: dict, now: datetime) -> bool:
    """Whether a claim row takes one of the prompt's ``overlap`` places at ``now`` (done, or live and unexpired)."""
    return r["status"] == "done" or (r["status"] == "live" and r["expires_at"] > now)


def live_claim(cur: duckdb.DuckDBPyConnection, annotator: str, now: datetime, round_id: int | None = None) -> dict | None:
    """The annotator's unexpired, unsubmitted claim (newest first), e.g. to resume after a reload."""
    return fetch_one(cur, f"""SELECT {_CLAIM_COLS} FROM review_claims
                              WHERE annotator = ? AND status = 'live' AND expires_at > ? AND (? IS NULL OR round_id = ?)
                              ORDER BY claimed_at DESC LIMIT 1""", [annotator, now, round_id, round_id])


def claims_of(cur: duckdb.DuckDBPyConnection, round_id: int, prompt_id: str | None = None) -> list[dict]:
    return fetch_all(cur, f"SELECT {_CLAIM_COLS} FROM review_claims WHERE round_id = ? AND (? IS NULL OR prompt_id = ?) "
                          "ORDER BY prompt_id, slot", [round_id, prompt_id, prompt_id])


def _insert_claim(cur, round_id, prompt_id, slot, annotator, status, now, expires) -> None:
    cur.execute(f"INSERT INTO review_claims ({_CLAIM_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [round_id, prompt_id, slot, annotator, status, now, expires])


def try_claim(cur: duckdb.DuckDBPyConnection, round_id: int, prompt_id: str, annotator: str, overlap: int,
              now: datetime, expires: datetime, status: str = "live") -> bool:
    """Take a slot of (round, prompt) inside the caller's transaction; False when none may be taken.

    ``status='done'`` records a submitted label: if every slot went to others meanwhile (the claim had
    expired and was taken over), the label gets an extra slot past ``overlap`` and False is returned.
    """
    rows = claim_rows(cur, round_id, [prompt_id]).get(prompt_id, [])
    mine = next((r for r in rows if r["annotator"] == annotator), None)
    if mine is not None and mine["status"] == "skipped":
        cur.execute("DELETE FROM review_claims WHERE round_id = ? AND prompt_id = ? AND annotator = ?",
                    [round_id, prompt_id, annotator])
        rows, mine = [r for r in rows if r is not mine], None
    if mine is not None:
        if mine["status"] == "done":
            return status == "done"
        cur.execute("UPDATE review_claims SET status = ?, claimed_at = ?, expires_at = ? "
                    "WHERE round_id = ? AND prompt_id = ? AND annotator = ?",
                    [status, now, expires, round_id, prompt_id, annotator])
        return True
    taken = {r["slot"]: r for r in rows}
    if sum(holds_place(r, now) for r in rows) < overlap:
        for slot in range(overlap):
            row = taken.get(slot)
            if row is None:
                _insert_claim(cur, round_id, prompt_id, slot, annotator, status, now, expires)
                return True
            if not holds_place(row, now):
                n = cur.execute("UPDATE review_claims SET annotator = ?, status = ?, claimed_at = ?, expires_at = ? "
                                "WHERE round_id = ? AND prompt_id = ? AND slot = ? AND status = 'live' "
                                "AND expires_at <= ?",
                                [annotator, status, now, expires, round_id, prompt_id, slot, now]).fetchone()[0]
                if n:
                    return True
    if status == "done":  # a late label: keep the record on an extra slot
        _insert_claim(cur, round_id, prompt_id, max(max(taken, default=-1) + 1, overlap), annotator, "done", now,
                      expires)
    return False


def claim(cur: duckdb.DuckDBPyConnection, round_id: int, prompt_id: str, annotator: str, *, overlap: int,
          claim_minutes: float, now: datetime, rows: list[dict] | None = None) -> bool:
    """Atomically claim one slot of (round, prompt) for the annotator; False when it may not.

    ``rows`` (the prompt's claim rows as just read) enables the fast path: when the first slot is
    free a single INSERT claims it (its primary key settles any race); otherwise a transaction that
    re-reads the rows runs, retried on conflicts.
    """
    expires = now + timedelta(minutes=claim_minutes)
    if rows is not None and not rows:
        try:
            _insert_claim(cur, round_id, prompt_id, 0, annotator, "live", now, expires)
            return True
        except CONFLICTS:
            pass
    try:
        return run_in_transaction(cur, lambda: try_claim(cur, round_id, prompt_id, annotator, overlap, now, expires),
                                  retries=CLAIM_RETRIES)
    except CONFLICTS:
        return False


def close_claim(cur: duckdb.DuckDBPyConnection, round_id: int, prompt_id: str, annotator: str) -> bool:
    """Mark the annotator's live (or done) claim ``done`` inside the caller's transaction; False when they
    hold none (it expired and was taken over, or was never made)."""
    return bool(cur.execute("UPDATE review_claims SET status = 'done' WHERE round_id = ? AND prompt_id = ? "
                            "AND annotator = ? AND status IN ('live', 'done')",
                            [round_id, prompt_id, annotator]).fetchone()[0])


def reopen_claim(cur: duckdb.DuckDBPyConnection, round_id: int, prompt_id: str, annotator: str, now: datetime,
                 expires: datetime) -> bool:
    """Make the annotator's (not skipped) claim live again until ``expires``, inside the caller's
    transaction; False when they hold none."""
    return bool(cur.execute("UPDATE review_claims SET status = 'live', claimed_at = ?, expires_at = ? "
                            "WHERE round_id = ? AND prompt_id = ? AND annotator = ? AND status <> 'skipped'",
                            [now, expires, round_id, prompt_id, annotator]).fetchone()[0])


def skip_claim(cur: duckdb.DuckDBPyConnection, round_id: int, prompt_id: str, annotator: str, now: datetime) -> None:
    """Move the annotator's claim to a negative slot inside the caller's transaction: the place is free
    again, they stay off the prompt."""
    low = scalar(cur, "SELECT min(slot) FROM review_claims WHERE round_id = ? AND prompt_id = ?", [round_id, prompt_id])
    cur.execute("DELETE FROM review_claims WHERE round_id = ? AND prompt_id = ? AND annotator = ?",
                [round_id, prompt_id, annotator])
    _insert_claim(cur, round_id, prompt_id, min(low or 0, 0) - 1, annotator, "skipped", now, now)
