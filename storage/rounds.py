"""Rounds, their steps, and checkpoints (the lineage tables)."""

from __future__ import annotations

import json
from typing import Any

import duckdb

from storage.db import fetch_all as _rows
from storage.db import fetch_one as _row

BASE_CHECKPOINT = "c0"


def ensure_first_round(cur: duckdb.DuckDBPyConnection, base_model: str, base_path: str | None = None) -> None:
    """Register the base checkpoint c0 and open round 1 (idempotent)."""
    if get_checkpoint(cur, BASE_CHECKPOINT) is None:
        add_checkpoint(cur, BASE_CHECKPOINT, round_id=None, parent_id=None, base_model=base_model,
                       path=base_path or (f"checkpoints/{BASE_CHECKPOINT}" if base_model in ("tiny", "demo")
                                          else base_model),
                       kind="base", meta={"model": base_model})
    if get_round(cur, 1) is None:
        cur.execute("INSERT INTO rounds (round_id, policy_checkpoint_id, status, step) VALUES (1, ?, 'collecting', 'generate')",
                    [BASE_CHECKPOINT])


def add_checkpoint(cur, checkpoint_id: str, round_id: int | None, parent_id: str | None, base_model: str,
                   path: str, kind: str, meta: dict[str, Any]) -> None:
    cur.execute(
        "INSERT INTO checkpoints (checkpoint_id, round_id, parent_id, base_model, path, kind, meta) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [checkpoint_id, round_id, parent_id, base_model, path, kind, json.dumps(meta)],
    )


def get_checkpoint(cur, checkpoint_id: str) -> dict | None:
    return _row(cur, "SELECT * FROM checkpoints WHERE checkpoint_id = ?", [checkpoint_id])


def list_checkpoints(cur) -> list[dict]:
    return _rows(cur, "SELECT * FROM checkpoints ORDER BY created_at")


def get_round(cur, round_id: int) -> dict | None:
    return _row(cur, "SELECT * FROM rounds WHERE round_id = ?", [round_id])


def current_round(cur) -> dict:
    """The newest round (the one collecting candidates and labels)."""
    r = _row(cur, "SELECT * FROM rounds ORDER BY round_id DESC LIMIT 1")
    if r is None:
        raise RuntimeError("workspace has no round; was it created with `prefloop init`?")
    return r


def list_rounds(cur) -> list[dict]:
    return _rows(cur, "SELECT * FROM rounds ORDER BY round_id")


def set_round(cur, round_id: int, **fields: Any) -> None:
    allowed = {"status", "step", "config", "started_at", "finished_at", "error", "promoted", "promote_reason",
               "policy_checkpoint_id"}
    bad = set(fields) - allowed
    if bad:
        raise ValueError(f"unknown round fields {sorted(bad)}")
    sets = ", ".join(f"{k} = ?" for k in fields)
    vals = [json.dumps(v) if k == "config" and not isinstance(v, str) else v for k, v in fields.items()]
    cur.execute(f"UPDATE rounds SET {sets} WHERE round_id = ?", [*vals, round_id])


def open_round(cur, round_id: int, policy_checkpoint_id: str) -> None:
    cur.execute("INSERT INTO rounds (round_id, policy_checkpoint_id, status, step) VALUES (?, ?, 'collecting', 'generate')",
                [round_id, policy_checkpoint_id])


def start_step(cur, round_id: int, step: str, run_dir: str, job_pid: int | None = None) -> None:
    cur.execute(
        "INSERT OR REPLACE INTO round_steps (round_id, step, status, run_dir, job_pid, started_at) "
        "VALUES (?, ?, 'running', ?, ?, current_timestamp)", [round_id, step, run_dir, job_pid])


def finish_step(cur, round_id: int, step: str, status: str, error: str | None = None,
                summary: dict | None = None) -> None:
    cur.execute(
        "UPDATE round_steps SET status = ?, error = ?, summary = ?, finished_at = current_timestamp "
        "WHERE round_id = ? AND step = ?",
        [status, error, json.dumps(summary) if summary is not None else None, round_id, step])


def get_step(cur, round_id: int, step: str) -> dict | None:
    return _row(cur, "SELECT * FROM round_steps WHERE round_id = ? AND step = ?", [round_id, step])


def list_steps(cur, round_id: int) -> list[dict]:
    return _rows(cur, "SELECT * FROM round_steps WHERE round_id = ? ORDER BY started_at", [round_id])


def add_train_metrics(cur, round_id: int, rows: list[dict]) -> None:
    if not rows:
        return
    cur.executemany(
        "INSERT OR REPLACE INTO train_metrics (round_id, step, epoch, loss, rewards_chosen, rewards_rejected, "
        "margin, accuracy, lr) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [[round_id, r["step"], r.get("epoch"), r.get("loss"), r.get("rewards_chosen"), r.get("rewards_rejected"),
          r.get("margin"), r.get("accuracy"), r.get("lr")] for r in rows])


def train_metrics(cur, round_id: int) -> list[dict]:
    return _rows(cur, "SELECT * FROM train_metrics WHERE round_id = ? ORDER BY step", [round_id])


def table_counts(cur) -> dict[str, int]:
    tables = ["images", "prompts", "candidates", "judgments", "labels", "pairs", "checkpoints", "rounds",
              "train_metrics", "evals", "users"]
    return {t: cur.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}


def complete_training(cur, *, round_id: int, checkpoint: dict[str, Any], metrics: list[dict],
                      open_next: bool = True) -> None:
    """Ingest a finished training in one transaction: metrics, the new checkpoint, the round's status,
    and (``open_next``) the next round on the new checkpoint."""
    cur.execute("BEGIN TRANSACTION")
    try:
        cur.execute("DELETE FROM train_metrics WHERE round_id = ?", [round_id])
        add_train_metrics(cur, round_id, metrics)
        add_checkpoint(cur, **checkpoint)
        set_round(cur, round_id, status="trained", step="train")
        if open_next and get_round(cur, round_id + 1) is None:
            open_round(cur, round_id + 1, checkpoint["checkpoint_id"])
        cur.execute("COMMIT")
    except Exception:
        cur.execute("ROLLBACK")
        raise
