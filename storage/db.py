"""Small helpers shared by the storage modules: fetching rows as dicts, and the ONE transaction helper.

Every transaction in the code base opens here. ``transaction(cur)`` is BEGIN ... COMMIT, with a
ROLLBACK and re-raise on any error; ``run_in_transaction(cur, fn, retries=N)`` runs ``fn`` in one and,
where concurrent writers can collide, retries it (after a short jittered pause) on a DuckDB
transaction conflict or constraint violation (``CONFLICTS``: how a race between two writers shows up,
at write or at commit time). ``read_only_transaction(cur)`` is the read-only variant that is always
rolled back (guarded user SQL).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import duckdb

log = logging.getLogger(__name__)

T = TypeVar("T")

CONFLICTS = (duckdb.TransactionException, duckdb.ConstraintException)
"""What a race between two writers raises in DuckDB (at write or commit time); retried by run_in_transaction."""


def fetch_one(cur: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> dict | None:
    rel = cur.execute(sql, params or [])
    row = rel.fetchone()
    if row is None:
        return None
    return dict(zip([d[0] for d in rel.description], row))


def fetch_all(cur: duckdb.DuckDBPyConnection, sql: str, params: list | None = None) -> list[dict]:
    rel = cur.execute(sql, params or [])
    cols = [d[0] for d in rel.description]
    return [dict(zip(cols, r)) for r in rel.fetchall()]


def scalar(cur: duckdb.DuckDBPyConnection, sql: str, params: list | None = None):
    row = cur.execute(sql, params or []).fetchone()
    return None if row is None else row[0]


# ---------------------------------------------------------------------------------------------- transactions

def _rollback(cur: duckdb.DuckDBPyConnection) -> None:
    try:
        cur.execute("ROLLBACK")
    except duckdb.Error:
        pass  # a failed COMMIT already ended the transaction


@contextmanager
def transaction(cur: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """BEGIN ... COMMIT around the block; on any error ROLLBACK and re-raise. No retry."""
    cur.execute("BEGIN TRANSACTION")
    try:
        yield cur
        cur.execute("COMMIT")
    except BaseException:
        _rollback(cur)
        raise


@contextmanager
def read_only_transaction(cur: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """BEGIN TRANSACTION READ ONLY around the block, always rolled back afterwards (a write fails in DuckDB)."""
    cur.execute("BEGIN TRANSACTION READ ONLY")
    try:
        yield cur
    finally:
        _rollback(cur)


def run_in_transaction(cur: duckdb.DuckDBPyConnection, fn: Callable[[], T], retries: int = 1) -> T:
    """Run ``fn`` in one transaction (``transaction``) and return its result.

    With ``retries`` > 1 a transaction that fails on a conflict (``CONFLICTS``) is rolled back and run
    again after a short jittered pause, at most ``retries`` times in all; the last conflict is raised.
    """
    for attempt in range(retries):
        try:
            with transaction(cur):
                return fn()
        except CONFLICTS as err:
            if attempt == retries - 1:
                raise
            log.debug("transaction conflict (attempt %d): %s", attempt + 1, err)
            time.sleep(random.uniform(0, 0.002 * (attempt + 1)))
    raise ValueError(f"retries must be at least 1 (got {retries})")
