"""The review queue in a server's memory (``QueueCache``) and ``claim_next``, which serves from it.

The ranks themselves are computed and stored by ``storage.review_queue``; claims are taken through
``storage.claims``. One ``QueueCache`` lives on each ``AppContext`` (never module-level).
"""

from __future__ import annotations

import threading
import time
from datetime import datetime

import duckdb

from storage import claims, review_queue
from storage.db import CONFLICTS


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
        st = review_queue.queue_state(cur, round_id)
        if st is None or st["n_prompts"] == 0:  # never computed, or computed before the round had candidates
            try:
                review_queue.refresh_queue(cur, round_id, judge=self.judge)
            except CONFLICTS:
                pass  # another thread computed it at the same moment
            st = review_queue.queue_state(cur, round_id)
            if st is None:
                return []
        if cached is None or cached[0] != st["version"]:
            ids = review_queue.queue_prompt_ids(cur, round_id, order)
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
            rows_of = claims.claim_rows(cur, round_id, batch)
            for j, prompt_id in enumerate(batch):
                rows = rows_of.get(prompt_id, [])
                if complete_prefix and sum(r["status"] == "done" for r in rows) >= overlap:
                    self._advance(key, i + j + 1)
                    continue
                complete_prefix = False
                mine = next((r for r in rows if r["annotator"] == annotator), None)
                if mine is not None and mine["status"] != "live":
                    continue  # done or skipped by this annotator (an expired claim of theirs may be renewed)
                if mine is None and sum(claims.holds_place(r, now) for r in rows) >= overlap:
                    continue
                with self._lock:
                    if (round_id, prompt_id) in self._inflight:
                        continue
                    self._inflight.add((round_id, prompt_id))
                try:
                    if claims.claim(cur, round_id, prompt_id, annotator, overlap=overlap,
                                    claim_minutes=claim_minutes, now=now, rows=rows):
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
    if order not in review_queue.QUEUE_ORDERS:
        raise ValueError(f"unknown queue order {order!r}; choose one of {', '.join(review_queue.QUEUE_ORDERS)}")
    held = claims.live_claim(cur, annotator, now, round_id) if resume else None
    if held is not None:
        return held["prompt_id"]
    return (cache or QueueCache()).next_prompt(cur, round_id, annotator, order=order, overlap=overlap,
                                               claim_minutes=claim_minutes, now=now)
