"""Prompts, candidates and labels: ids, bulk inserts, look-ups.

Bulk inserts go through a registered pyarrow table and one ``INSERT ... SELECT ... WHERE NOT EXISTS``
(tens of thousands of rows per second), never row by row. Every insert skips rows that are already
present, so re-running an import adds nothing. ``write_import`` writes one import in ONE transaction.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import duckdb
import pyarrow as pa

from storage import images as images_db
from storage.db import fetch_all, fetch_one, scalar, transaction

PROMPT_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("image_id", pa.string()),
    ("question", pa.string()),
    ("source", pa.string()),
    ("split", pa.string()),
    ("reference", pa.string()),
    ("meta", pa.string()),
])

CANDIDATE_SCHEMA = pa.schema([
    ("candidate_id", pa.string()),
    ("prompt_id", pa.string()),
    ("round_id", pa.int32()),
    ("checkpoint_id", pa.string()),
    ("text", pa.string()),
    ("origin", pa.string()),
    ("view", pa.string()),
    ("augmentation", pa.string()),
    ("sampling", pa.string()),
    ("model", pa.string()),
    ("engine", pa.string()),
    ("seed", pa.int64()),
    ("sample_index", pa.int32()),
])

LABEL_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("round_id", pa.int32()),
    ("annotator", pa.string()),
    ("source", pa.string()),
    ("kind", pa.string()),
    ("chosen_id", pa.string()),
    ("rejected_id", pa.string()),
    ("ranking", pa.string()),
    ("all_bad", pa.bool_()),
    ("skipped_reason", pa.string()),
    ("comment", pa.string()),
    ("active_seconds", pa.float64()),
])

_DEFAULTS: dict[str, Any] = {"view": "original", "kind": "label", "source": "human", "all_bad": False,
                             "sample_index": 0}
_JSON_COLUMNS = {"meta", "augmentation", "sampling", "ranking"}


def _short_hash(*parts: object) -> str:
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8"))
    return h.hexdigest()[:16]


def make_prompt_id(image_id: str, question: str) -> str:
    """Deterministic prompt id of an (image, question) when the import gives none."""
    return _short_hash("prompt", image_id, question)


def make_candidate_id(prompt_id: str, index: int, text: str) -> str:
    """Deterministic id of an imported candidate (so re-import finds it again)."""
    return _short_hash("candidate", prompt_id, index, text)


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    cols = {}
    for f in schema:
        values = [r.get(f.name, _DEFAULTS.get(f.name)) for r in rows]
        if f.name in _JSON_COLUMNS:
            values = [v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in values]
        cols[f.name] = pa.array(values, f.type)
    return pa.table(cols, schema=schema)


@contextmanager
def _registered(cur: duckdb.DuckDBPyConnection, table: pa.Table) -> Iterator[str]:
    name = f"_batch_{uuid.uuid4().hex}"
    cur.register(name, table)
    try:
        yield name
    finally:
        cur.unregister(name)


# ---------------------------------------------------------------------------------------------- inserts

def insert_prompts(cur: duckdb.DuckDBPyConnection, rows: list[dict]) -> int:
    """Bulk-insert prompts (keys of PROMPT_SCHEMA; ``meta`` a dict or JSON text); returns how many are new.

    A row is skipped when its prompt_id or its (image_id, question) is already present. ``rows`` must
    not repeat a prompt_id or an (image_id, question) among themselves.
    """
    if not rows:
        return 0
    with _registered(cur, _table(rows, PROMPT_SCHEMA)) as name:
        return cur.execute(
            f"""INSERT INTO prompts (prompt_id, image_id, question, source, split, reference, meta)
                SELECT n.prompt_id, n.image_id, n.question, n.source, n.split, n.reference, n.meta FROM {name} n
                WHERE NOT EXISTS (SELECT 1 FROM prompts p WHERE p.prompt_id = n.prompt_id)
                  AND NOT EXISTS (SELECT 1 FROM prompts p WHERE p.image_id = n.image_id AND p.question = n.question)
            """).fetchone()[0]


def insert_candidates(cur: duckdb.DuckDBPyConnection, rows: list[dict]) -> int:
    """Bulk-insert candidates (keys of CANDIDATE_SCHEMA; JSON columns as dicts or text).

    Defaults: view 'original', sample_index 0. Rows whose candidate_id exists are skipped; returns
    how many are new. Used for imported and generated candidates alike.
    """
    if not rows:
        return 0
    cols = ", ".join(CANDIDATE_SCHEMA.names)
    with _registered(cur, _table(rows, CANDIDATE_SCHEMA)) as name:
        return cur.execute(
            f"""INSERT INTO candidates ({cols}) SELECT {cols} FROM {name} n
                WHERE NOT EXISTS (SELECT 1 FROM candidates c WHERE c.candidate_id = n.candidate_id)""").fetchone()[0]


def insert_labels(cur: duckdb.DuckDBPyConnection, rows: list[dict], skip_duplicates: bool = False) -> int:
    """Append label rows (keys of LABEL_SCHEMA; label_id and created_at come from the database).

    Labels are append-only. With ``skip_duplicates`` a row equal to an existing label on (prompt_id,
    annotator, source, kind, chosen_id, rejected_id) is skipped (imports use this to stay idempotent).
    Returns how many rows were added.
    """
    if not rows:
        return 0
    cols = ", ".join(LABEL_SCHEMA.names)
    where = ""
    if skip_duplicates:
        where = """WHERE NOT EXISTS (SELECT 1 FROM labels l WHERE l.prompt_id = n.prompt_id
                     AND l.annotator = n.annotator AND l.source = n.source AND l.kind = n.kind
                     AND l.chosen_id IS NOT DISTINCT FROM n.chosen_id
                     AND l.rejected_id IS NOT DISTINCT FROM n.rejected_id)"""
    with _registered(cur, _table(rows, LABEL_SCHEMA)) as name:
        return cur.execute(f"INSERT INTO labels ({cols}) SELECT {cols} FROM {name} n {where}").fetchone()[0]


def write_import(cur: duckdb.DuckDBPyConnection, images: list[dict], prompts: list[dict],
                 candidates: list[dict], labels: list[dict]) -> dict[str, int]:
    """Write one import in ONE transaction (all or nothing); returns the counts of new rows."""
    with transaction(cur):
        return {
            "images": images_db.insert_images(cur, images),
            "prompts": insert_prompts(cur, prompts),
            "candidates": insert_candidates(cur, candidates),
            "labels": insert_labels(cur, labels, skip_duplicates=True),
        }


# ---------------------------------------------------------------------------------------------- look-ups

def existing_prompt_keys(cur: duckdb.DuckDBPyConnection, keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """{(image_id, question): prompt_id} for the given keys already in the workspace."""
    if not keys:
        return {}
    table = pa.table({"image_id": pa.array([k[0] for k in keys], pa.string()),
                      "question": pa.array([k[1] for k in keys], pa.string())})
    with _registered(cur, table) as name:
        rows = cur.execute(f"SELECT p.image_id, p.question, p.prompt_id FROM prompts p "
                           f"JOIN {name} n ON p.image_id = n.image_id AND p.question = n.question").fetchall()
    return {(r[0], r[1]): r[2] for r in rows}


def existing_prompt_ids(cur: duckdb.DuckDBPyConnection, prompt_ids: list[str]) -> dict[str, tuple[str, str]]:
    """{prompt_id: (image_id, question)} for the given ids already in the workspace."""
    if not prompt_ids:
        return {}
    with _registered(cur, pa.table({"prompt_id": pa.array(list(prompt_ids), pa.string())})) as name:
        rows = cur.execute(f"SELECT p.prompt_id, p.image_id, p.question FROM prompts p "
                           f"JOIN {name} n USING (prompt_id)").fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


_PROMPT_SELECT = """SELECT p.prompt_id, p.image_id, i.path AS image_path, i.width, i.height, p.question,
                           p.source, p.split, p.reference, p.meta, p.created_at
                    FROM prompts p JOIN images i USING (image_id)"""


def _decode_meta(row: dict | None) -> dict | None:
    if row is not None and isinstance(row.get("meta"), str):
        row["meta"] = json.loads(row["meta"])
    return row


def get_prompt(cur: duckdb.DuckDBPyConnection, prompt_id: str) -> dict | None:
    """One prompt with its workspace-relative ``image_path`` (``meta`` decoded), or None."""
    return _decode_meta(fetch_one(cur, f"{_PROMPT_SELECT} WHERE p.prompt_id = ?", [prompt_id]))


def list_prompts(cur: duckdb.DuckDBPyConnection, split: str | None = None, limit: int | None = None) -> list[dict]:
    """Prompts (optionally of one split) in import order, each with its workspace-relative ``image_path``."""
    sql = f"{_PROMPT_SELECT} WHERE (? IS NULL OR p.split = ?) ORDER BY p.created_at, p.prompt_id"
    params: list = [split, split]
    if limit is not None:
        sql += " LIMIT ?"
        params.append(int(limit))
    return [_decode_meta(r) for r in fetch_all(cur, sql, params)]


def count_prompts(cur: duckdb.DuckDBPyConnection, split: str | None = None) -> int:
    return scalar(cur, "SELECT count(*) FROM prompts WHERE (? IS NULL OR split = ?)", [split, split])


def list_candidates(cur: duckdb.DuckDBPyConnection, round_id: int | None = None,
                    prompt_id: str | None = None) -> list[dict]:
    """Candidates, optionally of one round and/or one prompt, ordered by prompt then sample index."""
    return fetch_all(cur, """SELECT * FROM candidates
                             WHERE (? IS NULL OR round_id = ?) AND (? IS NULL OR prompt_id = ?)
                             ORDER BY prompt_id, view, sample_index, candidate_id""",
                     [round_id, round_id, prompt_id, prompt_id])


def list_labels(cur: duckdb.DuckDBPyConnection, prompt_id: str | None = None,
                source: str | None = None) -> list[dict]:
    """Label rows in the order they were added, optionally of one prompt and/or source."""
    return fetch_all(cur, """SELECT * FROM labels
                             WHERE (? IS NULL OR prompt_id = ?) AND (? IS NULL OR source = ?)
                             ORDER BY label_id""", [prompt_id, prompt_id, source, source])
