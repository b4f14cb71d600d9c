"""Small fetch helpers shared by the storage modules (rows as dicts)."""

from __future__ import annotations

import duckdb


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
