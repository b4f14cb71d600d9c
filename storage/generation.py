"""What the generate step reads (prompts still to answer) and ingests (candidates from a job's Parquet)."""

from __future__ import annotations

from pathlib import Path

import duckdb

from storage.db import fetch_all, scalar

CANDIDATE_COLUMNS = ("candidate_id", "prompt_id", "round_id", "checkpoint_id", "text", "origin", "view",
                     "augmentation", "sampling", "model", "engine", "seed", "sample_index")


def prompts_to_generate(cur: duckdb.DuckDBPyConnection, round_id: int, checkpoint_id: str, workspace_root: str,
                        split: str = "train", limit: int | None = None,
                        prompt_ids: list[str] | None = None) -> list[dict]:
    """Prompts of ``split`` that have no candidate yet from ``checkpoint_id`` in ``round_id``."""
    params: list = [workspace_root, round_id, checkpoint_id, split]
    where = ""
    if prompt_ids:
        where = " AND p.prompt_id IN (SELECT unnest(?))"
        params.append(list(prompt_ids))
    sql = f"""
        SELECT p.prompt_id, ? || '/' || i.path AS image_path, p.question
        FROM prompts p JOIN images i ON i.image_id = p.image_id
        WHERE NOT EXISTS (SELECT 1 FROM candidates c WHERE c.prompt_id = p.prompt_id AND c.round_id = ?
                          AND c.checkpoint_id = ? AND c.origin IN ('policy', 'seva_augmented'))
          AND p.split = ?{where}
        ORDER BY p.created_at, p.prompt_id"""
    if limit is not None:
        sql += " LIMIT ?"
        params.append(int(limit))
    return fetch_all(cur, sql, params)


def ingest_candidates_parquet(cur: duckdb.DuckDBPyConnection, path: Path) -> int:
    """Insert a job's candidates.parquet in one transaction; rows already present are left alone."""
    cols = ", ".join(CANDIDATE_COLUMNS)
    cur.execute("BEGIN TRANSACTION")
    try:
        before = scalar(cur, "SELECT count(*) FROM candidates")
        cur.execute(f"""
            INSERT INTO candidates ({cols})
            SELECT {cols} FROM read_parquet(?) AS n
            WHERE NOT EXISTS (SELECT 1 FROM candidates c WHERE c.candidate_id = n.candidate_id)""", [str(path)])
        added = scalar(cur, "SELECT count(*) FROM candidates") - before
        cur.execute("COMMIT")
    except Exception:
        cur.execute("ROLLBACK")
        raise
    return added


def candidate_counts(cur: duckdb.DuckDBPyConnection, round_id: int) -> dict[str, int]:
    return {r["origin"]: r["n"] for r in fetch_all(
        cur, "SELECT origin, count(*) AS n FROM candidates WHERE round_id = ? GROUP BY origin", [round_id])}
