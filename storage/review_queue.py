"""The review queue (tables ``review_queue`` and ``review_queue_state``): orders, ranks, state.

``refresh_queue(cur, round_id)`` computes, once per ingest, a rank per (round, prompt) for every order
in ``QUEUE_ORDERS`` and stores it in ``review_queue``; serving walks the precomputed ranks (the
server's in-memory copy is ``app.server.queue_cache.QueueCache``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import duckdb

from storage.db import fetch_all, fetch_one, run_in_transaction, scalar

log = logging.getLogger(__name__)

REFRESH_RETRIES = 10
"""Attempts of a queue refresh that collides with a concurrent one."""


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

    n = run_in_transaction(cur, work, retries=REFRESH_RETRIES) if transaction else work()
    log.info("review queue of round %s: %d prompts", round_id, n)
    return n


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


def queue_prompt_ids(cur: duckdb.DuckDBPyConnection, round_id: int, order: str) -> list[str]:
    """The prompt ids of one order, first served first (what a server keeps in memory)."""
    return [r[0] for r in cur.execute("SELECT prompt_id FROM review_queue WHERE round_id = ? "
                                      "AND queue_order = ? ORDER BY rank", [round_id, order]).fetchall()]
