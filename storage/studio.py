"""Read functions for the studio's admin tabs (Data, Export), and the Export tab's saved example queries.

The example queries are plain read-only SELECTs over the workspace schema: the Export tab runs them
through the same guard as any typed query (``storage.export.run_query``); a test runs every one.
"""

from __future__ import annotations

import duckdb

from storage.db import fetch_all

EXAMPLE_QUERIES: dict[str, str] = {
    "pairs of the latest round": """\
-- The chosen/rejected pairs of the newest round that has pairs, with both answers.
SELECT p.round_id, p.prompt_id, pr.question, p.source, p.strategy, p.margin,
       c.text AS chosen, r.text AS rejected, p.frozen_at
FROM pairs p
JOIN prompts pr ON pr.prompt_id = p.prompt_id
JOIN candidates c ON c.candidate_id = p.chosen_id
JOIN candidates r ON r.candidate_id = p.rejected_id
WHERE p.round_id = (SELECT max(round_id) FROM pairs)
ORDER BY p.prompt_id, p.chosen_id""",
    "human vs AI overrides": """\
-- Each annotator's standing label (latest row per prompt; an undo cancels it) against each judge's
-- best/worst answer of the same prompt: overrides_ai is true where the human picked another winner.
WITH latest AS (
    SELECT * FROM (
        SELECT l.*, row_number() OVER (PARTITION BY l.round_id, l.prompt_id, l.annotator
                                       ORDER BY l.label_id DESC) AS rn
        FROM labels l WHERE l.source = 'human')
    WHERE rn = 1 AND kind = 'label' AND chosen_id IS NOT NULL),
ai AS (
    SELECT c.round_id, c.prompt_id, j.judge,
           arg_max(c.candidate_id, j.overall) AS ai_chosen, arg_min(c.candidate_id, j.overall) AS ai_rejected
    FROM judgments j JOIN candidates c ON c.candidate_id = j.candidate_id
    WHERE j.status = 'ok' AND j.overall IS NOT NULL
    GROUP BY c.round_id, c.prompt_id, j.judge)
SELECT l.round_id, l.prompt_id, l.annotator, ai.judge,
       l.chosen_id AS human_chosen, ai.ai_chosen, l.rejected_id AS human_rejected, ai.ai_rejected,
       l.chosen_id <> ai.ai_chosen AS overrides_ai, l.comment
FROM latest l JOIN ai ON ai.round_id = l.round_id AND ai.prompt_id = l.prompt_id
ORDER BY overrides_ai DESC, l.round_id, l.prompt_id, l.annotator, ai.judge""",
    "judge disagreement": """\
-- Candidates scored by two or more judges, widest disagreement (normalised 0-1 overall) first.
SELECT c.round_id, c.prompt_id, c.candidate_id,
       count(DISTINCT j.judge) AS judges,
       min(j.overall) AS lowest, max(j.overall) AS highest, max(j.overall) - min(j.overall) AS spread,
       string_agg(j.judge || '=' || CAST(round(j.overall, 2) AS VARCHAR), ', ' ORDER BY j.judge) AS scores
FROM judgments j JOIN candidates c ON c.candidate_id = j.candidate_id
WHERE j.status = 'ok' AND j.overall IS NOT NULL
GROUP BY c.round_id, c.prompt_id, c.candidate_id
HAVING count(DISTINCT j.judge) >= 2
ORDER BY spread DESC, c.round_id, c.candidate_id""",
    "rounds at a glance": """\
-- Every round: its policy, status, how many pairs by source, and its eval against the previous checkpoint.
SELECT r.round_id, r.policy_checkpoint_id, r.status, r.step, r.promoted,
       (SELECT count(*) FROM pairs p WHERE p.round_id = r.round_id) AS pairs,
       (SELECT count(*) FROM pairs p WHERE p.round_id = r.round_id AND p.source = 'human') AS human_pairs,
       e.judge AS eval_judge, e.wins, e.losses, e.ties, e.n
FROM rounds r LEFT JOIN evals e ON e.round_id = r.round_id AND e.eval_set = 'heldout'
ORDER BY r.round_id""",
    "annotator activity": """\
-- Labels, skips and undos per annotator, with their median active seconds per label.
SELECT annotator,
       count(*) FILTER (WHERE kind = 'label' AND skipped_reason IS NULL) AS labels,
       count(*) FILTER (WHERE skipped_reason IS NOT NULL) AS skips,
       count(*) FILTER (WHERE kind = 'undo') AS undos,
       median(active_seconds) FILTER (WHERE kind = 'label') AS median_active_s,
       max(created_at) AS last_label_at
FROM labels WHERE source = 'human'
GROUP BY annotator ORDER BY labels DESC, annotator""",
}


def prompt_counts(cur: duckdb.DuckDBPyConnection) -> list[dict]:
    """Prompts per (source, split)."""
    return fetch_all(cur, "SELECT source, split, count(*) AS prompts FROM prompts GROUP BY ALL ORDER BY ALL")


def round_counts(cur: duckdb.DuckDBPyConnection) -> list[dict]:
    """Per round: status, candidates (policy/augmented/imported; eval answers apart), human labels, pairs."""
    return fetch_all(cur, """
        SELECT r.round_id, r.status,
               (SELECT count(*) FROM candidates c WHERE c.round_id = r.round_id AND c.origin <> 'eval') AS candidates,
               (SELECT count(*) FROM candidates c WHERE c.round_id = r.round_id AND c.origin = 'eval') AS eval_answers,
               (SELECT count(*) FROM labels l WHERE l.round_id = r.round_id AND l.source = 'human'
                                              AND l.kind = 'label') AS human_labels,
               (SELECT count(*) FROM pairs p WHERE p.round_id = r.round_id) AS pairs
        FROM rounds r ORDER BY r.round_id""")


def judge_counts(cur: duckdb.DuckDBPyConnection) -> list[dict]:
    """Judgments per (round, judge, status), over the candidates of each round."""
    return fetch_all(cur, """
        SELECT c.round_id, j.judge, j.status, count(*) AS judgments
        FROM judgments j JOIN candidates c ON c.candidate_id = j.candidate_id
        GROUP BY ALL ORDER BY ALL""")
