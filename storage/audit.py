"""The audit log: who did what, when (labels, round starts, imports, exports, user changes)."""

from __future__ import annotations

import json

import duckdb

from storage.db import fetch_all


def record(cur: duckdb.DuckDBPyConnection, actor: str, action: str, detail: dict | None = None) -> None:
    """Append one audit row. Never pass secrets in ``detail``."""
    cur.execute("INSERT INTO audit_log (actor, action, detail) VALUES (?, ?, ?)",
                [actor, action, json.dumps(detail or {}, default=str)])


def recent(cur: duckdb.DuckDBPyConnection, limit: int = 100, action: str | None = None) -> list[dict]:
    if action:
        return fetch_all(cur, "SELECT * FROM audit_log WHERE action = ? ORDER BY audit_id DESC LIMIT ?", [action, limit])
    return fetch_all(cur, "SELECT * FROM audit_log ORDER BY audit_id DESC LIMIT ?", [limit])
