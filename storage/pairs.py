"""The pairs table: chosen/rejected pairs of a round with provenance; frozen when training starts."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from storage.db import fetch_all, scalar, transaction

PAIR_SCHEMA = pa.schema([
    ("round_id", pa.int32()), ("prompt_id", pa.string()), ("chosen_id", pa.string()), ("rejected_id", pa.string()),
    ("source", pa.string()), ("strategy", pa.string()), ("margin", pa.float64()), ("rubric_delta", pa.string()),
    ("chosen_scores", pa.string()), ("rejected_scores", pa.string()),
])
"""A batch of pair rows as Arrow (the JSON columns as JSON text)."""
PAIR_COLUMNS = tuple(PAIR_SCHEMA.names)


@dataclass(frozen=True)
class BuiltPairs:
    """A round's pairs as one strategy built them (in SQL or in the Python reference), not yet stored."""

    table: pa.Table
    """one row per pair, the columns of ``PAIR_SCHEMA``"""
    skipped: dict[str, int]
    """skip reason (``backend.pairs``) -> number of prompts that gave no pair for it"""
    needs_admin: list[str]
    """prompts whose annotators tied, sorted: dropped until an admin decides"""
    prompts: int
    """prompts of the round that had candidates"""
    path: str
    """which implementation built them: "sql" (``storage.pair_sql``) or "python" (``backend.pairs``)"""

    @property
    def by_source(self) -> dict[str, int]:
        counts = pc.value_counts(self.table.column("source")).to_pylist() if self.table.num_rows else []
        return {c["values"]: c["counts"] for c in counts}


def _js(v):
    return None if v is None else (v if isinstance(v, str) else json.dumps(v))


def pairs_table(rows: list[dict]) -> pa.Table:
    """Pair dicts (keys of ``PAIR_COLUMNS``; JSON columns as dicts or text) as a ``PAIR_SCHEMA`` table."""
    json_cols = ("rubric_delta", "chosen_scores", "rejected_scores")
    return pa.table({f.name: pa.array([_js(r.get(f.name)) if f.name in json_cols else r.get(f.name) for r in rows],
                                      f.type) for f in PAIR_SCHEMA}, schema=PAIR_SCHEMA)


def replace_draft_pairs(cur: duckdb.DuckDBPyConnection, round_id: int, rows: list[dict] | pa.Table) -> int:
    """Replace the round's unfrozen pairs with ``rows`` in one transaction; frozen rounds are refused."""
    if is_frozen(cur, round_id):
        raise ValueError(f"round {round_id}'s pairs are frozen (training started); they never change")
    with transaction(cur):
        cur.execute("DELETE FROM pairs WHERE round_id = ? AND frozen_at IS NULL", [round_id])
        insert_pairs(cur, rows)
    return len(rows)


def insert_pairs(cur: duckdb.DuckDBPyConnection, rows: list[dict] | pa.Table) -> None:
    """Bulk-insert pair rows through a registered Arrow table (one statement, not one per row)."""
    table = rows if isinstance(rows, pa.Table) else pairs_table(rows)
    if not table.num_rows:
        return
    name = f"_pairs_{uuid.uuid4().hex}"
    cur.register(name, table)
    try:
        cur.execute(f"INSERT INTO pairs ({', '.join(PAIR_COLUMNS)}) SELECT {', '.join(PAIR_COLUMNS)} FROM {name}")
    finally:
        cur.unregister(name)


def freeze(cur: duckdb.DuckDBPyConnection, round_id: int) -> int:
    cur.execute("UPDATE pairs SET frozen_at = current_timestamp WHERE round_id = ? AND frozen_at IS NULL", [round_id])
    return count(cur, round_id)


def is_frozen(cur: duckdb.DuckDBPyConnection, round_id: int) -> bool:
    return bool(scalar(cur, "SELECT count(*) FROM pairs WHERE round_id = ? AND frozen_at IS NOT NULL", [round_id]))


def count(cur: duckdb.DuckDBPyConnection, round_id: int | None = None) -> int:
    if round_id is None:
        return scalar(cur, "SELECT count(*) FROM pairs")
    return scalar(cur, "SELECT count(*) FROM pairs WHERE round_id = ?", [round_id])


def counts_by_source(cur: duckdb.DuckDBPyConnection, round_id: int) -> dict[str, int]:
    return {r["source"]: r["n"] for r in fetch_all(
        cur, "SELECT source, count(*) AS n FROM pairs WHERE round_id = ? GROUP BY source ORDER BY source", [round_id])}


def training_rows(cur: duckdb.DuckDBPyConnection, round_id: int, workspace_root: str) -> list[dict]:
    """The round's pairs joined with their prompt, image path and both answers (for the train job)."""
    return fetch_all(cur, """
        SELECT p.prompt_id, p.chosen_id, p.rejected_id, p.source, p.margin,
               ? || '/' || i.path AS image_path, pr.question, c.text AS chosen_text, r.text AS rejected_text
        FROM pairs p
        JOIN prompts pr ON pr.prompt_id = p.prompt_id
        JOIN images i ON i.image_id = pr.image_id
        JOIN candidates c ON c.candidate_id = p.chosen_id
        JOIN candidates r ON r.candidate_id = p.rejected_id
        WHERE p.round_id = ?
        ORDER BY p.prompt_id, p.chosen_id, p.rejected_id""", [workspace_root, round_id])


# The three reads a pair strategy starts from, as SELECTs with named parameters ($round_id, $split): the
# Python path fetches them (pairing_*); the SQL path (storage.pair_sql) uses the labels' text as its CTE and
# the same rules, written for speed, for candidates and judgments (newest: created_at, then judgment_id).
PAIRING_CANDIDATES_SQL = """
    SELECT c.candidate_id, c.prompt_id, c.text, c.origin, c.view, c.sample_index
    FROM candidates c JOIN prompts p ON p.prompt_id = c.prompt_id
    WHERE c.round_id = $round_id AND c.origin <> 'eval' AND p.split = $split"""

PAIRING_JUDGMENTS_SQL = """
    SELECT candidate_id, judge, helpfulness, correctness, coherence, complexity, verbosity, score, overall
    FROM (
        SELECT j.*, row_number() OVER (PARTITION BY j.candidate_id, j.judge
                                  ORDER BY j.created_at DESC, j.judgment_id DESC) AS rn
        FROM judgments j JOIN candidates c ON c.candidate_id = j.candidate_id
        WHERE c.round_id = $round_id AND j.status = 'ok')
    WHERE rn = 1"""

PAIRING_LABELS_SQL = """
    SELECT prompt_id, annotator, source, chosen_id, rejected_id, ranking, all_bad, skipped_reason
    FROM (
        SELECT l.*, row_number() OVER (PARTITION BY l.prompt_id, l.annotator ORDER BY l.label_id DESC) AS rn
        FROM labels l WHERE l.round_id = $round_id)
    WHERE rn = 1 AND kind = 'label'"""


def pairing_candidates(cur: duckdb.DuckDBPyConnection, round_id: int, prompt_split: str = "train") -> list[dict]:
    """Candidates of a round's prompts (policy, augmented and imported) with their view and sample index."""
    return fetch_all(cur, PAIRING_CANDIDATES_SQL + "\n    ORDER BY c.prompt_id, c.view, c.sample_index, c.candidate_id",
                     {"round_id": round_id, "split": prompt_split})


def pairing_judgments(cur: duckdb.DuckDBPyConnection, round_id: int) -> list[dict]:
    """The newest `ok` judgment per (candidate, judge) for the round's candidates."""
    return fetch_all(cur, PAIRING_JUDGMENTS_SQL, {"round_id": round_id})


def pairing_labels(cur: duckdb.DuckDBPyConnection, round_id: int) -> list[dict]:
    """The latest label per (prompt, annotator) of a round; an annotator whose latest row is an undo has none."""
    return fetch_all(cur, PAIRING_LABELS_SQL + "\n    ORDER BY prompt_id, annotator", {"round_id": round_id})
