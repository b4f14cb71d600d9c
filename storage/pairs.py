"""The pairs table: chosen/rejected pairs of a round with provenance; frozen when training starts."""

from __future__ import annotations

import json

import duckdb

from storage.db import fetch_all, scalar, transaction

PAIR_COLUMNS = ("round_id", "prompt_id", "chosen_id", "rejected_id", "source", "strategy", "margin",
                "rubric_delta", "chosen_scores", "rejected_scores")


def _js(v):
    return None if v is None else (v if isinstance(v, str) else json.dumps(v))


def replace_draft_pairs(cur: duckdb.DuckDBPyConnection, round_id: int, rows: list[dict]) -> int:
    """Replace the round's unfrozen pairs with ``rows`` in one transaction; frozen rounds are refused."""
    if is_frozen(cur, round_id):
        raise ValueError(f"round {round_id}'s pairs are frozen (training started); they never change")
    with transaction(cur):
        cur.execute("DELETE FROM pairs WHERE round_id = ? AND frozen_at IS NULL", [round_id])
        insert_pairs(cur, rows)
    return len(rows)


def insert_pairs(cur: duckdb.DuckDBPyConnection, rows: list[dict]) -> None:
    """Bulk-insert pair rows through a registered Arrow table (one statement, not one per row)."""
    if not rows:
        return
    import uuid

    import pyarrow as pa

    table = pa.table({
        "round_id": pa.array([r["round_id"] for r in rows], pa.int32()),
        **{c: pa.array([r[c] for r in rows], pa.string()) for c in ("prompt_id", "chosen_id", "rejected_id",
                                                                       "source", "strategy")},
        "margin": pa.array([r.get("margin") for r in rows], pa.float64()),
        **{c: pa.array([_js(r.get(c)) for r in rows], pa.string()) for c in ("rubric_delta", "chosen_scores",
                                                                           "rejected_scores")},
    })
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


def pairing_candidates(cur: duckdb.DuckDBPyConnection, round_id: int, prompt_split: str = "train") -> list[dict]:
    """Candidates of a round's prompts (policy, augmented and imported) with their view and sample index."""
    return fetch_all(cur, """
        SELECT c.candidate_id, c.prompt_id, c.text, c.origin, c.view, c.sample_index
        FROM candidates c JOIN prompts p ON p.prompt_id = c.prompt_id
        WHERE c.round_id = ? AND c.origin <> 'eval' AND p.split = ?
        ORDER BY c.prompt_id, c.view, c.sample_index, c.candidate_id""", [round_id, prompt_split])


def pairing_judgments(cur: duckdb.DuckDBPyConnection, round_id: int) -> list[dict]:
    """The newest `ok` judgment per (candidate, judge) for the round's candidates."""
    return fetch_all(cur, """
        SELECT candidate_id, judge, helpfulness, correctness, coherence, complexity, verbosity, score, overall
        FROM (
            SELECT j.*, row_number() OVER (PARTITION BY j.candidate_id, j.judge ORDER BY j.created_at DESC) AS rn
            FROM judgments j JOIN candidates c ON c.candidate_id = j.candidate_id
            WHERE c.round_id = ? AND j.status = 'ok')
        WHERE rn = 1""", [round_id])


def pairing_labels(cur: duckdb.DuckDBPyConnection, round_id: int) -> list[dict]:
    """The latest label per (prompt, annotator) of a round; an annotator whose latest row is an undo has none."""
    return fetch_all(cur, """
        SELECT prompt_id, annotator, source, chosen_id, rejected_id, ranking, all_bad, skipped_reason
        FROM (
            SELECT l.*, row_number() OVER (PARTITION BY l.prompt_id, l.annotator ORDER BY l.label_id DESC) AS rn
            FROM labels l WHERE l.round_id = ?)
        WHERE rn = 1 AND kind = 'label'
        ORDER BY prompt_id, annotator""", [round_id])
