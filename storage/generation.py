"""What the generate step reads (prompts still to answer) and ingests (candidates from a job's Parquet)."""

from __future__ import annotations

from pathlib import Path

import duckdb

from storage.db import fetch_all, scalar, transaction

CANDIDATE_COLUMNS = ("candidate_id", "prompt_id", "round_id", "checkpoint_id", "text", "origin", "view",
                     "augmentation", "sampling", "model", "engine", "seed", "sample_index")


def prompts_to_generate(cur: duckdb.DuckDBPyConnection, round_id: int, checkpoint_id: str, workspace_root: str,
                        split: str = "train", limit: int | None = None,
                        prompt_ids: list[str] | None = None, eval_origin: bool = False) -> list[dict]:
    """Prompts of ``split`` that have no candidate yet from ``checkpoint_id`` in ``round_id`` (eval
    candidates with ``eval_origin``, policy and augmented ones otherwise)."""
    origins = ["eval"] if eval_origin else ["policy", "seva_augmented"]
    params: list = [workspace_root, round_id, checkpoint_id, origins, split]
    where = ""
    if prompt_ids:
        where = " AND p.prompt_id IN (SELECT unnest(?))"
        params.append(list(prompt_ids))
    sql = f"""
        SELECT p.prompt_id, ? || '/' || i.path AS image_path, p.question
        FROM prompts p JOIN images i ON i.image_id = p.image_id
        WHERE NOT EXISTS (SELECT 1 FROM candidates c WHERE c.prompt_id = p.prompt_id AND c.round_id = ?
                          AND c.checkpoint_id = ? AND list_contains(?, c.origin))
          AND p.split = ?{where}
        ORDER BY p.created_at, p.prompt_id"""
    if limit is not None:
        sql += " LIMIT ?"
        params.append(int(limit))
    return fetch_all(cur, sql, params)


def ingest_candidates_parquet(cur: duckdb.DuckDBPyConnection, path: Path, origin: str | None = None) -> int:
    """Insert a job's candidates.parquet in one transaction; rows already present are left alone.
    ``origin`` overrides the job's origin column (the eval step stores its answers as `eval`)."""
    cols = ", ".join(CANDIDATE_COLUMNS)
    select = cols if origin is None else cols.replace("origin", "? AS origin")
    with transaction(cur):
        before = scalar(cur, "SELECT count(*) FROM candidates")
        cur.execute(f"""
            INSERT INTO candidates ({cols})
            SELECT {select} FROM read_parquet(?) AS n
            WHERE NOT EXISTS (SELECT 1 FROM candidates c WHERE c.candidate_id = n.candidate_id)""",
                    ([origin] if origin else []) + [str(path)])
        return scalar(cur, "SELECT count(*) FROM candidates") - before


def candidate_counts(cur: duckdb.DuckDBPyConnection, round_id: int) -> dict[str, int]:
    return {r["origin"]: r["n"] for r in fetch_all(
        cur, "SELECT origin, count(*) AS n FROM candidates WHERE round_id = ? GROUP BY origin", [round_id])}


def eval_prompts(cur: duckdb.DuckDBPyConnection, round_id: int, workspace_root: str) -> list[dict]:
    """Held-out prompts with the round's eval answers: one dict per prompt with ``candidates``
    [{candidate_id, text, checkpoint_id}] in checkpoint order."""
    rows = fetch_all(cur, """
        SELECT p.prompt_id, p.question, p.image_id, ? || '/' || i.path AS image_path, p.reference,
               c.candidate_id, c.text, c.checkpoint_id
        FROM candidates c JOIN prompts p ON p.prompt_id = c.prompt_id JOIN images i ON i.image_id = p.image_id
        WHERE c.round_id = ? AND c.origin = 'eval'
        ORDER BY p.prompt_id, c.checkpoint_id, c.sample_index""", [workspace_root, round_id])
    out: dict[str, dict] = {}
    for r in rows:
        p = out.setdefault(r["prompt_id"], {k: r[k] for k in ("prompt_id", "question", "image_id", "image_path",
                                                               "reference")} | {"candidates": []})
        p["candidates"].append({"candidate_id": r["candidate_id"], "text": r["text"],
                                "checkpoint_id": r["checkpoint_id"]})
    return list(out.values())


def count_prompts_in_split(cur: duckdb.DuckDBPyConnection, split: str) -> int:
    return scalar(cur, "SELECT count(*) FROM prompts WHERE split = ?", [split])
