"""Reads for ``prefloop agreement``: every judge's ok scores per candidate, and the latest human labels."""

from __future__ import annotations

import duckdb

from storage.db import fetch_all


def judged_scores(cur: duckdb.DuckDBPyConnection, round_id: int | None = None) -> list[dict]:
    """One row per ok judgment of a (non-eval) candidate: round_id, prompt_id, candidate_id, judge,
    judge_version, the five metrics, score and overall; optionally for one round."""
    return fetch_all(cur, """
        SELECT c.round_id, c.prompt_id, j.candidate_id, j.judge, j.judge_version,
               j.helpfulness, j.correctness, j.coherence, j.complexity, j.verbosity, j.score, j.overall
        FROM judgments j JOIN candidates c ON c.candidate_id = j.candidate_id
        WHERE j.status = 'ok' AND c.origin <> 'eval' AND (? IS NULL OR c.round_id = ?)
        ORDER BY c.round_id, c.prompt_id, j.candidate_id, j.judge, j.judge_version""", [round_id, round_id])


def latest_labels(cur: duckdb.DuckDBPyConnection, round_id: int | None = None) -> list[dict]:
    """The latest label per (prompt, annotator) that names a chosen and a rejected candidate.

    An annotator whose latest row for a prompt is an undo, all-bad or a skip has no preference there.
    """
    return fetch_all(cur, """
        SELECT round_id, prompt_id, annotator, source, chosen_id, rejected_id
        FROM (SELECT l.*, row_number() OVER (PARTITION BY l.prompt_id, l.annotator ORDER BY l.label_id DESC) AS rn
              FROM labels l WHERE (? IS NULL OR l.round_id = ?))
        WHERE rn = 1 AND kind = 'label' AND chosen_id IS NOT NULL AND rejected_id IS NOT NULL
        ORDER BY round_id, prompt_id, annotator""", [round_id, round_id])


def prompt_questions(cur: duckdb.DuckDBPyConnection, prompt_ids: list[str]) -> dict[str, str]:
    """{prompt_id: question} for the given prompts."""
    if not prompt_ids:
        return {}
    rows = fetch_all(cur, "SELECT prompt_id, question FROM prompts WHERE prompt_id IN (SELECT unnest(?))",
                     [list(prompt_ids)])
    return {r["prompt_id"]: r["question"] for r in rows}
