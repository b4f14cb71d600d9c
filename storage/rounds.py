"""Rounds, their steps, and checkpoints (the lineage tables)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import duckdb

from storage.db import fetch_all as _rows
from storage.db import fetch_one as _row
from storage.db import scalar, transaction

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


def checkpoint_meta(cur, checkpoint_id: str) -> dict:
    """A checkpoint's meta.json as ingested ({} for an unknown checkpoint)."""
    meta = scalar(cur, "SELECT meta FROM checkpoints WHERE checkpoint_id = ?", [checkpoint_id])
    return json.loads(meta) if isinstance(meta, str) else (meta or {})


def training_method(cur, round_id: int) -> str | None:
    """How a round trained (``train.method``): from its checkpoint's meta (a checkpoint without one predates the
    field: dpo), else from the config the round was started with; None when neither says."""
    return scalar(cur, """
        SELECT coalesce(json_extract_string(c.meta, '$.method'), CASE WHEN c.checkpoint_id IS NOT NULL THEN 'dpo' END,
                        json_extract_string(r.config, '$.resolved.train.method'))
        FROM rounds r LEFT JOIN checkpoints c ON c.round_id = r.round_id
        WHERE r.round_id = ?""", [round_id])


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


def current_round_id(cur: duckdb.DuckDBPyConnection) -> int | None:
    """The newest round (the one collecting candidates and labels), or None before `prefloop init`."""
    return scalar(cur, "SELECT max(round_id) FROM rounds")


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
    with transaction(cur):
        cur.execute("DELETE FROM train_metrics WHERE round_id = ?", [round_id])
        add_train_metrics(cur, round_id, metrics)
        add_checkpoint(cur, **checkpoint)
        set_round(cur, round_id, status="trained", step="train")
        if open_next and get_round(cur, round_id + 1) is None:
            open_round(cur, round_id + 1, checkpoint["checkpoint_id"])


def finish_round(cur, round_id: int, next_policy: str, finished_at: datetime) -> None:
    """Mark a round done and open the next one on ``next_policy`` (unless it exists), in one transaction."""
    with transaction(cur):
        set_round(cur, round_id, status="done", step="done", finished_at=finished_at, error=None)
        if get_round(cur, round_id + 1) is None:
            open_round(cur, round_id + 1, next_policy)


def fail_stale_steps(cur) -> list[dict]:
    """Steps still marked `running` when an owner opens the workspace belong to a dead owner (its jobs
    died with it): mark them failed so `round resume` can retry them. Returns the steps changed."""
    stale = _rows(cur, "SELECT round_id, step FROM round_steps WHERE status = 'running'")
    if stale:
        cur.execute("UPDATE round_steps SET status = 'failed', finished_at = current_timestamp, "
                    "error = 'the owner process stopped while this step ran (crash or kill); "
                    "`prefloop round resume` retries it' WHERE status = 'running'")
        cur.execute("UPDATE rounds SET status = 'failed', error = 'interrupted: the owner process stopped' "
                    "WHERE status = 'running'")
    return stale


def labelled_prompts(cur, round_id: int) -> int:
    """Prompts of a round with at least one standing human decision (latest label per annotator)."""
    return cur.execute("""
        SELECT count(DISTINCT prompt_id) FROM (
            SELECT prompt_id, kind, skipped_reason,
                   row_number() OVER (PARTITION BY prompt_id, annotator ORDER BY label_id DESC) AS rn
            FROM labels WHERE round_id = ? AND source = 'human')
        WHERE rn = 1 AND kind = 'label' AND skipped_reason IS NULL""", [round_id]).fetchone()[0]


def last_promoted_checkpoint(cur, before_round: int) -> str:
    """The checkpoint the next round starts from: the newest promoted round's, else the base."""
    row = _row(cur, "SELECT round_id FROM rounds WHERE promoted AND round_id < ? ORDER BY round_id DESC LIMIT 1",
               [before_round])
    return f"c{row['round_id']}" if row else BASE_CHECKPOINT


def add_eval(cur, *, round_id: int, baseline_checkpoint_id: str, checkpoint_id: str, judge: str, wins: int,
             losses: int, ties: int, n: int, eval_set: str = "heldout") -> None:
    cur.execute("DELETE FROM evals WHERE round_id = ? AND judge = ? AND eval_set = ?", [round_id, judge, eval_set])
    cur.execute("INSERT INTO evals (round_id, baseline_checkpoint_id, checkpoint_id, judge, eval_set, wins, losses, "
                "ties, n) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [round_id, baseline_checkpoint_id, checkpoint_id, judge, eval_set, wins, losses, ties, n])


def list_evals(cur, round_id: int | None = None) -> list[dict]:
    if round_id is None:
        return _rows(cur, "SELECT * FROM evals ORDER BY round_id, judge")
    return _rows(cur, "SELECT * FROM evals WHERE round_id = ? ORDER BY judge", [round_id])


def eval_scores(cur, round_id: int, judge: str) -> list[dict]:
    """Per held-out prompt and checkpoint: the eval candidate's newest ok overall score from ``judge``."""
    return _rows(cur, """
        SELECT c.prompt_id, c.checkpoint_id, c.candidate_id,
               (SELECT j.overall FROM judgments j WHERE j.candidate_id = c.candidate_id AND j.judge = ?
                  AND j.status = 'ok' ORDER BY j.created_at DESC LIMIT 1) AS overall
        FROM candidates c WHERE c.round_id = ? AND c.origin = 'eval'
        ORDER BY c.prompt_id, c.checkpoint_id""", [judge, round_id])
