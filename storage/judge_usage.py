"""What a judge step will send and what earlier replies cost: the reads behind `prefloop doctor`'s judge
cost row."""

from __future__ import annotations

import duckdb

from storage.db import fetch_all


def judge_inputs(cur: duckdb.DuckDBPyConnection, round_id: int) -> list[dict]:
    """One row per prompt the round's judge step will see: every train prompt (its candidates may not be
    generated yet) and any prompt with candidates in the round (eval answers excluded). Each row has the
    question, the image's width and height, and the round's candidates of that prompt: ``n_candidates``
    and ``candidate_chars`` (their total length; 0 and 0 before generation)."""
    return fetch_all(cur, """
        SELECT p.question, i.width, i.height, count(c.candidate_id) AS n_candidates,
               coalesce(sum(length(c.text)), 0) AS candidate_chars
        FROM prompts p JOIN images i ON i.image_id = p.image_id
        LEFT JOIN candidates c ON c.prompt_id = p.prompt_id AND c.round_id = ? AND c.origin <> 'eval'
        WHERE p.split = 'train' OR c.candidate_id IS NOT NULL
        GROUP BY p.prompt_id, p.question, i.width, i.height
        ORDER BY p.prompt_id""", [round_id])


def measured_tokens(cur: duckdb.DuckDBPyConnection, judge: str) -> dict:
    """Tokens of the paid replies ``judge`` already stored (ok or invalid, with a token count): ``candidates``
    (judgment rows), ``tokens_in`` and ``tokens_out`` (each row holds its share of its reply's tokens)."""
    [row] = fetch_all(cur, """
        SELECT count(*) AS candidates, coalesce(sum(tokens_in), 0) AS tokens_in,
               coalesce(sum(tokens_out), 0) AS tokens_out
        FROM judgments
        WHERE judge = ? AND status IN ('ok', 'invalid')
          AND tokens_in IS NOT NULL AND tokens_out IS NOT NULL""",
        [judge])
    return row
