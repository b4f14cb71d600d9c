"""The review queue, claims, human labels (submit / undo), the item view and progress.

Queue: ``refresh_queue(cur, round_id)`` computes, once per ingest, a rank per (round, prompt) for every
order in ``QUEUE_ORDERS`` and stores it in ``review_queue``; serving walks the precomputed ranks.

Claims (``review_claims``) are the authority on who has or had a prompt. A (round, prompt) has
``overlap`` slots (primary key round, prompt, slot) and an annotator holds at most one row (unique
round, prompt, annotator): with overlap 1 two annotators never hold the same prompt, and nobody
gets a prompt twice. A live claim expires after ``claim_minutes`` and its slot is taken over by the
next annotator; a submitted one is ``done`` and keeps its slot; a skip moves to a negative slot
(``skipped``), freeing the place for someone else. A race shows up in DuckDB as a transaction
conflict or a constraint violation, at write or commit time; both are retried.

Labels are append-only: an undo appends a ``kind='undo'`` row; the latest row per (round, prompt,
annotator) counts. A label that arrives after the round's pairs were frozen is kept.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import duckdb

from storage import audit
from storage.db import fetch_all, fetch_one, scalar

log = logging.getLogger(__name__)

_CONFLICTS = (duckdb.TransactionException, duckdb.ConstraintException)
_CLAIM_COLS = "round_id, prompt_id, slot, annotator, status, claimed_at, expires_at"


# ---------------------------------------------------------------------------------------------- queue orders

@dataclass(frozen=True)
class OrderSpec:
    """How a queue order ranks a round's prompts: SQL over the per-prompt stats relation
    (prompt_id, created_at, disagreement, margin)."""

    priority: str
    """expression stored in review_queue.priority (shown to admins, useful when debugging)"""
    order_by: str
    """ORDER BY clause: the first row is served first"""


QueueOrder = Callable[[int], OrderSpec]


def _disagreement(round_id: int) -> OrderSpec:
    """Judges disagree most first: the largest spread of `overall` between judges on one candidate."""
    return OrderSpec("disagreement", "disagreement DESC NULLS LAST, created_at, prompt_id")


def _margin(round_id: int) -> OrderSpec:
    """Smallest AI margin first: best minus worst `overall` of the AI-pair judge (unscored last)."""
    return OrderSpec("margin", "margin ASC NULLS LAST, created_at, prompt_id")


def _random(round_id: int) -> OrderSpec:
    """A fixed shuffle per round (hash of prompt id and round)."""
    return OrderSpec("NULL", f"hash(prompt_id || ':{int(round_id)}'), prompt_id")


def _in_order(round_id: int) -> OrderSpec:
    """Import order."""
    return OrderSpec("NULL", "created_at, prompt_id")


QUEUE_ORDERS: dict[str, QueueOrder] = {
    "disagreement": _disagreement,
    "margin": _margin,
    "random": _random,
    "in_order": _in_order,
}

_STATS_SQL = """
    cands AS MATERIALIZED (
        SELECT c.candidate_id, c.prompt_id FROM candidates c JOIN prompts p ON p.prompt_id = c.prompt_id
        WHERE c.round_id = $round AND c.origin <> 'eval' AND p.split = 'train'),
    eligible AS (SELECT prompt_id FROM cands GROUP BY prompt_id HAVING count(*) >= 2),
    lj AS (
        SELECT j.candidate_id, j.judge, j.overall, cands.prompt_id
        FROM judgments j JOIN cands ON cands.candidate_id = j.candidate_id
        WHERE j.status = 'ok' AND j.overall IS NOT NULL
        QUALIFY row_number() OVER (PARTITION BY j.candidate_id, j.judge
                                   ORDER BY j.created_at DESC, j.judgment_id DESC) = 1),
    spread AS (SELECT prompt_id, candidate_id, max(overall) - min(overall) AS s
               FROM lj GROUP BY prompt_id, candidate_id HAVING count(*) >= 2),
    dis AS (SELECT prompt_id, max(s) AS disagreement FROM spread GROUP BY prompt_id),
    jm AS (SELECT prompt_id, judge, max(overall) - min(overall) AS m
           FROM lj GROUP BY prompt_id, judge HAVING count(*) >= 2),
    mar AS (SELECT prompt_id, arg_min(m, CASE WHEN judge = $judge THEN '' ELSE '~' || judge END) AS margin
            FROM jm GROUP BY prompt_id),
    stats AS MATERIALIZED (
        SELECT e.prompt_id, p.created_at, d.disagreement, m.margin
        FROM eligible e JOIN prompts p ON p.prompt_id = e.prompt_id
        LEFT JOIN dis d ON d.prompt_id = e.prompt_id LEFT JOIN mar m ON m.prompt_id = e.prompt_id)
"""


def _rollback(cur: duckdb.DuckDBPyConnection) -> None:
    try:
        cur.execute("ROLLBACK")
    except duckdb.Error:
        pass  # a failed COMMIT already ended the transaction


def _run_in_transaction(cur: duckdb.DuckDBPyConnection, fn: Callable[[], Any], retries: int = 10) -> Any:
    """Run ``fn`` in BEGIN/COMMIT, retrying (after a short jittered pause) on DuckDB transaction conflicts."""
    for attempt in range(retries):
        cur.execute("BEGIN TRANSACTION")
        try:
            out = fn()
            cur.execute("COMMIT")
            return out
        except _CONFLICTS as err:
            _rollback(cur)
            if attempt == retries - 1:
                raise
            log.debug("transaction conflict (attempt %d): %s", attempt + 1, err)
            time.sleep(random.uniform(0, 0.002 * (attempt + 1)))
        except BaseException:
            _rollback(cur)
            raise
    raise AssertionError("unreachable")


def refresh_queue(cur: duckdb.DuckDBPyConnection, round_id: int, judge: str | None = None, *,
                  transaction: bool = True) -> int:
    """(Re)compute the queue ranks of every order for ``round_id``; returns how many prompts are queued.

    A train prompt with at least two candidates in the round is queued. Call it after ingesting
    candidates or judgments. ``judge`` is the AI-pair judge for the margin order (default: the
    alphabetically first judge that scored the prompt). ``transaction=False`` inside your own transaction.
    """
    parts = [f"SELECT $round, '{name}', prompt_id, CAST(row_number() OVER (ORDER BY {spec.order_by}) - 1 AS INTEGER), "
             f"CAST({spec.priority} AS DOUBLE) FROM stats"
             for name, spec in ((n, o(round_id)) for n, o in QUEUE_ORDERS.items())]
    sql = (f"INSERT INTO review_queue (round_id, queue_order, prompt_id, rank, priority) WITH {_STATS_SQL} "
           + " UNION ALL ".join(parts))

    def work() -> int:
        cur.execute("DELETE FROM review_queue WHERE round_id = ?", [round_id])
        cur.execute(sql, {"round": int(round_id), "judge": judge})
        n = scalar(cur, "SELECT count(*) FROM review_queue WHERE round_id = ? AND queue_order = 'in_order'",
                   [round_id])
        cur.execute("INSERT OR REPLACE INTO review_queue_state (round_id, version, n_prompts, judge, computed_at) "
                    "VALUES (?, ?, ?, ?, current_timestamp)", [round_id, uuid.uuid4().hex, n, judge])
        return n

    n = _run_in_transaction(cur, work) if transaction else work()
    log.info("review queue of round %s: %d prompts", round_id, n)
    return n


def current_round_id(cur: duckdb.DuckDBPyConnection) -> int | None:
    """The newest round (the one collecting candidates and labels), or None before `prefloop init`."""
    return scalar(cur, "SELECT max(round_id) FROM rounds")


def queue_state(cur: duckdb.DuckDBPyConnection, round_id: int) -> dict | None:
    """{version, n_prompts, judge, computed_at} of the round's queue, or None before the first refresh."""
    return fetch_one(cur, "SELECT version, n_prompts, judge, computed_at FROM review_queue_state WHERE round_id = ?",
                     [round_id])


def queue_size(cur: duckdb.DuckDBPyConnection, round_id: int) -> int:
    st = queue_state(cur, round_id)
    return st["n_prompts"] if st else 0


def queue_ranks(cur: duckdb.DuckDBPyConnection, round_id: int, order: str) -> list[dict]:
    """The whole queue of one order (prompt_id, rank, priority), first served first."""
    return fetch_all(cur, "SELECT prompt_id, rank, priority FROM review_queue WHERE round_id = ? AND queue_order = ? "
                          "ORDER BY rank", [round_id, order])


# ---------------------------------------------------------------------------------------------- claims

def _claim_rows(cur: duckdb.DuckDBPyConnection, round_id: int, prompt_ids: list[str]) -> dict[str, list[dict]]:
    rows = fetch_all(cur, f"SELECT {_CLAIM_COLS} FROM review_claims WHERE round_id = ? "
                          "AND prompt_id IN (SELECT unnest(?))", [round_id, prompt_ids])
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["prompt_id"], []).append(r)
    return out


def _holds_place(r: dict, now: datetime) -> bool:
    return r["status"] == "done" or (r["status"] == "live" and r["expires_at"] > now)


def live_claim(cur: duckdb.DuckDBPyConnection, annotator: str, now: datetime, round_id: int | None = None) -> dict | None:
    """The annotator's unexpired, unsubmitted claim (newest first), e.g. to resume after a reload."""
    return fetch_one(cur, f"""SELECT {_CLAIM_COLS} FROM review_claims
                              WHERE annotator = ? AND status = 'live' AND expires_at > ? AND (? IS NULL OR round_id = ?)
                              ORDER BY claimed_at DESC LIMIT 1""", [annotator, now, round_id, round_id])


def _insert_claim(cur, round_id, prompt_id, slot, annotator, status, now, expires) -> None:
    cur.execute(f"INSERT INTO review_claims ({_CLAIM_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [round_id, prompt_id, slot, annotator, status, now, expires])


def _try_claim(cur: duckdb.DuckDBPyConnection, round_id: int, prompt_id: str, annotator: str, overlap: int,
               now: datetime, expires: datetime, status: str = "live") -> bool:
    """Take a slot of (round, prompt) inside the caller's transaction; False when none may be taken.

    ``status='done'`` records a submitted label: if every slot went to others meanwhile (the claim had
    expired and was taken over), the label gets an extra slot past ``overlap`` and False is returned.
    """
    rows = _claim_rows(cur, round_id, [prompt_id]).get(prompt_id, [])
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
    if sum(_holds_place(r, now) for r in rows) < overlap:
        for slot in range(overlap):
            row = taken.get(slot)
            if row is None:
                _insert_claim(cur, round_id, prompt_id, slot, annotator, status, now, expires)
                return True
            if not _holds_place(row, now):
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
        except _CONFLICTS:
            pass
    try:
        return _run_in_transaction(cur, lambda: _try_claim(cur, round_id, prompt_id, annotator, overlap, now, expires),
                                   retries=5)
    except _CONFLICTS:
        return False


class QueueCache:
    """The queue ranks in memory, owned by one server (never module-level).

    ``next_prompt`` walks the ranks from a start hint: prompts before it had all their slots done when
    last seen. The hint is forgotten every ``rescan_s`` seconds (and on ``forget``) so a place freed by
    an undo, a skip or an expired claim is found again; the ranks are reloaded when the queue's version
    changes (checked at most every ``version_ttl_s`` seconds). A round whose queue is empty (never
    computed, or computed before it had candidates) is computed here, lazily.
    """

    def __init__(self, batch: int = 64, rescan_s: float = 30.0, version_ttl_s: float = 2.0, judge: str | None = None):
        self.batch, self.rescan_s, self.version_ttl_s = batch, rescan_s, version_ttl_s
        self.judge = judge
        """the AI-pair judge (``pairs.judge``) for a queue this cache computes lazily"""
        self._lock = threading.Lock()
        self._ids: dict[tuple[int, str], tuple[str, float, list[str]]] = {}
        self._start: dict[tuple[int, str, int], tuple[int, float]] = {}
        self._inflight: set[tuple[int, str]] = set()
        """prompts another thread of this server is claiming right now: skipped instead of raced for"""

    def forget(self, round_id: int | None = None) -> None:
        with self._lock:
            self._start = {k: v for k, v in self._start.items() if round_id is not None and k[0] != round_id}
            self._ids = {k: (ver, 0.0, ids) for k, (ver, _, ids) in self._ids.items()}

    def ids(self, cur: duckdb.DuckDBPyConnection, round_id: int, order: str) -> list[str]:
        key, clock = (round_id, order), time.monotonic()
        with self._lock:
            cached = self._ids.get(key)
        if cached is not None and cached[2] and clock - cached[1] < self.version_ttl_s:
            return cached[2]
        st = queue_state(cur, round_id)
        if st is None or st["n_prompts"] == 0:  # never computed, or computed before the round had candidates
            try:
                refresh_queue(cur, round_id, judge=self.judge)
            except _CONFLICTS:
                pass  # another thread computed it at the same moment
            st = queue_state(cur, round_id)
            if st is None:
                return []
        if cached is None or cached[0] != st["version"]:
            ids = [r[0] for r in cur.execute("SELECT prompt_id FROM review_queue WHERE round_id = ? "
                                             "AND queue_order = ? ORDER BY rank", [round_id, order]).fetchall()]
            with self._lock:
                self._start = {k: v for k, v in self._start.items() if k[:2] != key}
        else:
            ids = cached[2]
        with self._lock:
            self._ids[key] = (st["version"], clock, ids)
        return ids

    def _get_start(self, key: tuple[int, str, int]) -> int:
        clock = time.monotonic()
        with self._lock:
            start, since = self._start.get(key, (0, clock))
            if clock - since > self.rescan_s:
                start, since = 0, clock
            self._start[key] = (start, since)
            return start

    def _advance(self, key: tuple[int, str, int], start: int) -> None:
        with self._lock:
            old, since = self._start.get(key, (0, time.monotonic()))
            if start > old:
                self._start[key] = (start, since)

    def next_prompt(self, cur: duckdb.DuckDBPyConnection, round_id: int, annotator: str, *, order: str,
                    overlap: int, claim_minutes: float, now: datetime) -> str | None:
        ids = self.ids(cur, round_id, order)
        key = (round_id, order, overlap)
        i, complete_prefix = self._get_start(key), True
        while i < len(ids):
            batch = ids[i:i + self.batch]
            claims = _claim_rows(cur, round_id, batch)
            for j, prompt_id in enumerate(batch):
                rows = claims.get(prompt_id, [])
                if complete_prefix and sum(r["status"] == "done" for r in rows) >= overlap:
                    self._advance(key, i + j + 1)
                    continue
                complete_prefix = False
                mine = next((r for r in rows if r["annotator"] == annotator), None)
                if mine is not None and mine["status"] != "live":
                    continue  # done or skipped by this annotator (an expired claim of theirs may be renewed)
                if mine is None and sum(_holds_place(r, now) for r in rows) >= overlap:
                    continue
                with self._lock:
                    if (round_id, prompt_id) in self._inflight:
                        continue
                    self._inflight.add((round_id, prompt_id))
                try:
                    if claim(cur, round_id, prompt_id, annotator, overlap=overlap, claim_minutes=claim_minutes,
                             now=now, rows=rows):
                        return prompt_id
                finally:
                    with self._lock:
                        self._inflight.discard((round_id, prompt_id))
            i += len(batch)
        return None


def claim_next(cur: duckdb.DuckDBPyConnection, round_id: int, annotator: str, *, order: str, overlap: int,
               claim_minutes: float, now: datetime, cache: QueueCache | None = None, resume: bool = True) -> str | None:
    """Claim the next prompt for the annotator in ``order``; None when the queue has nothing for them.

    With ``resume``, a live claim the annotator already holds in this round comes first (a reload or
    an undo resumes that item). The queue is computed lazily when the round has none. Without a
    ``cache`` a throwaway one is used (tests, the CLI); a server keeps one.
    """
    if order not in QUEUE_ORDERS:
        raise ValueError(f"unknown queue order {order!r}; choose one of {', '.join(QUEUE_ORDERS)}")
    held = live_claim(cur, annotator, now, round_id) if resume else None
    if held is not None:
        return held["prompt_id"]
    return (cache or QueueCache()).next_prompt(cur, round_id, annotator, order=order, overlap=overlap,
                                               claim_minutes=claim_minutes, now=now)


def claims_of(cur: duckdb.DuckDBPyConnection, round_id: int, prompt_id: str | None = None) -> list[dict]:
    return fetch_all(cur, f"SELECT {_CLAIM_COLS} FROM review_claims WHERE round_id = ? AND (? IS NULL OR prompt_id = ?) "
                          "ORDER BY prompt_id, slot", [round_id, prompt_id, prompt_id])


# ---------------------------------------------------------------------------------------------- labels

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


def _skip_claim(cur, round_id: int, prompt_id: str, annotator: str, now: datetime) -> None:
    """Move the annotator's claim to a negative slot: the place is free again, they stay off the prompt."""
    low = scalar(cur, "SELECT min(slot) FROM review_claims WHERE round_id = ? AND prompt_id = ?", [round_id, prompt_id])
    cur.execute("DELETE FROM review_claims WHERE round_id = ? AND prompt_id = ? AND annotator = ?",
                [round_id, prompt_id, annotator])
    _insert_claim(cur, round_id, prompt_id, min(low or 0, 0) - 1, annotator, "skipped", now, now)


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
            _skip_claim(cur, round_id, prompt_id, annotator, now)
            held = True
        else:
            held = bool(cur.execute("UPDATE review_claims SET status = 'done' WHERE round_id = ? AND prompt_id = ? "
                                    "AND annotator = ? AND status IN ('live', 'done')",
                                    [round_id, prompt_id, annotator]).fetchone()[0])
            held = held or _try_claim(cur, round_id, prompt_id, annotator, overlap, now, expires, status="done")
        audit.record(cur, annotator, "label", {"label_id": label_id, "round_id": round_id, "prompt_id": prompt_id,
                                                "kind": decision.kind, "chosen_id": decision.chosen_id,
                                                "rejected_id": decision.rejected_id, "held_claim": held})
        return {"label_id": label_id, "held_claim": held}

    return _run_in_transaction(cur, work)


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
        n = cur.execute("UPDATE review_claims SET status = 'live', claimed_at = ?, expires_at = ? WHERE round_id = ? "
                        "AND prompt_id = ? AND annotator = ? AND status <> 'skipped'",
                        [now, expires, rid, pid, annotator]).fetchone()[0]
        held = bool(n) or _try_claim(cur, rid, pid, annotator, overlap, now, expires)
        audit.record(cur, annotator, "undo", {"label_id": label_id, "undo_id": undo_id, "round_id": rid,
                                               "prompt_id": pid, "held_claim": held})
        return {"undo_id": undo_id, "round_id": rid, "prompt_id": pid, "held_claim": held}

    return _run_in_transaction(cur, work)


# ---------------------------------------------------------------------------------------------- item view

_ITEM_SQL = """
    WITH c AS MATERIALIZED (SELECT candidate_id, text, origin, view, sample_index FROM candidates
                            WHERE prompt_id = $prompt AND round_id = $round AND origin <> 'eval')
    SELECT 'c' AS kind, candidate_id, text, origin, view, sample_index, NULL AS judge, NULL AS helpfulness,
           NULL AS correctness, NULL AS coherence, NULL AS complexity, NULL AS verbosity, NULL AS score,
           NULL AS overall, NULL AS reasoning, NULL AS created_at, NULL AS second_id, NULL AS winner FROM c
    UNION ALL
    SELECT 'j', j.candidate_id, NULL, NULL, NULL, NULL, j.judge, j.helpfulness, j.correctness, j.coherence,
           j.complexity, j.verbosity, j.score, j.overall, j.reasoning, j.created_at, NULL, NULL
    FROM judgments j SEMI JOIN c ON c.candidate_id = j.candidate_id WHERE j.status = 'ok'
    UNION ALL
    SELECT 'p', v.first_id, NULL, NULL, NULL, NULL, v.judge, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           v.second_id, v.winner
    FROM pairwise_verdicts v SEMI JOIN c ON c.candidate_id = v.first_id
    WHERE v.status = 'ok' AND v.second_id IN (SELECT candidate_id FROM c)"""

_JUDGMENT_KEYS = ("candidate_id", "judge", "helpfulness", "correctness", "coherence", "complexity", "verbosity",
                  "score", "overall", "reasoning")


def review_item(cur: duckdb.DuckDBPyConnection, round_id: int, prompt_id: str) -> dict | None:
    """One prompt as the review screen shows it, in two queries: {prompt, candidates, judgments (the latest
    ok one per candidate and judge), pairwise}; None for an unknown prompt."""
    prompt = fetch_one(cur, """SELECT p.prompt_id, p.question, p.reference, p.split, i.path AS image_path,
                                      i.width, i.height
                               FROM prompts p JOIN images i ON i.image_id = p.image_id WHERE p.prompt_id = ?""",
                       [prompt_id])
    if prompt is None:
        return None
    cands, latest, pairwise = [], {}, []
    for r in fetch_all(cur, _ITEM_SQL, {"prompt": prompt_id, "round": round_id}):
        if r["kind"] == "c":
            cands.append({k: r[k] for k in ("candidate_id", "text", "origin", "view", "sample_index")})
        elif r["kind"] == "j":
            key = (r["candidate_id"], r["judge"])
            if key not in latest or r["created_at"] >= latest[key]["created_at"]:
                latest[key] = r
        else:
            pairwise.append({"judge": r["judge"], "first_id": r["candidate_id"], "second_id": r["second_id"],
                             "winner": r["winner"]})
    cands.sort(key=lambda c: (c["view"], c["sample_index"], c["candidate_id"]))
    judgments = [{k: r[k] for k in _JUDGMENT_KEYS} for _, r in sorted(latest.items())]
    return {"prompt": prompt, "candidates": cands, "judgments": judgments, "pairwise": pairwise}


# ---------------------------------------------------------------------------------------------- progress

def round_progress(cur: duckdb.DuckDBPyConnection, round_id: int, overlap: int, now: datetime) -> dict:
    """{queued, labelled (>= 1 decision), complete (>= overlap decisions), live_claims} of a round."""
    row = fetch_one(cur, """
        WITH c AS (SELECT prompt_id, count(*) FILTER (WHERE status = 'done') AS done,
                          count(*) FILTER (WHERE status = 'live' AND expires_at > $now) AS live
                   FROM review_claims WHERE round_id = $round GROUP BY prompt_id)
        SELECT count(*) FILTER (WHERE done >= 1) AS labelled, count(*) FILTER (WHERE done >= $overlap) AS complete,
               coalesce(sum(live), 0) AS live_claims FROM c""", {"round": round_id, "overlap": overlap, "now": now})
    row["queued"] = queue_size(cur, round_id)
    return row


def annotator_day(cur: duckdb.DuckDBPyConnection, annotator: str) -> dict:
    """Today's (database-local day) {labels, skips, active_seconds} of one annotator, undone labels excluded."""
    return fetch_one(cur, """
        SELECT count(*) FILTER (WHERE skipped_reason IS NULL) AS labels,
               count(*) FILTER (WHERE skipped_reason IS NOT NULL) AS skips,
               coalesce(sum(active_seconds), 0) AS active_seconds
        FROM (SELECT * FROM labels WHERE annotator = ?
              QUALIFY row_number() OVER (PARTITION BY round_id, prompt_id ORDER BY label_id DESC) = 1)
        WHERE kind = 'label' AND created_at >= CAST(current_date AS TIMESTAMP)""", [annotator])
