"""What the review screen reads: one prompt with its candidates and judge scores, the round's progress,
an annotator's day (over ``prompts``, ``candidates``, ``judgments``, ``pairwise_verdicts``,
``review_claims`` and ``labels``)."""

from __future__ import annotations

from datetime import datetime

import duckdb

from storage.db import fetch_all, fetch_one
from storage.review_queue import queue_size

# ---------------------------------------------------------------------------------------------- item view

_ITEM_SQL = """
    WITH c AS MATERIALIZED (SELECT candidate_id, text, origin, view, sample_index FROM candidates
                            WHERE prompt_id = $prompt AND round_id = $round AND origin <> 'eval')
    SELECT 'c' AS kind, candidate_id, text, origin, view, sample_index, NULL AS judge, NULL AS helpfulness,
           NULL AS correctness, NULL AS coherence, NULL AS complexity, NULL AS verbosity, NULL AS score,
           NULL AS overall, NULL AS reasoning, NULL AS created_at, NULL AS second_id, NULL AS winner FROM c
    UNION ALL
    SELECT 'j', j.candidate_id, NULL, NULL, NULL, NULL, j.judge, j.helpfulness, j.correctness, j.coherence,
           j.complexity, j.verbosity, j.score, j.overall, j.reasoning, j.created_at, NULL, NULL
    FROM judgments j SEMI JOIN c ON c.candidate_id = j.candidate_id WHERE j.status = 'ok'
    UNION ALL
    SELECT 'p', v.first_id, NULL, NULL, NULL, NULL, v.judge, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
           v.second_id, v.winner
    FROM pairwise_verdicts v SEMI JOIN c ON c.candidate_id = v.first_id
    WHERE v.status = 'ok' AND v.second_id IN (SELECT candidate_id FROM c)"""

_JUDGMENT_KEYS = ("candidate_id", "judge", "helpfulness", "correctness", "coherence", "complexity", "verbosity",
                  "score", "overall", "reasoning")


def review_item(cur: duckdb.DuckDBPyConnection, round_id: int, prompt_id: str) -> dict | None:
    """One prompt as the review screen shows it, in two queries: {prompt, candidates, judgments (the latest
    ok one per candidate and judge), pairwise}; None for an unknown prompt."""
    prompt = fetch_one(cur, """SELECT p.prompt_id, p.question, p.reference, p.split, i.path AS image_path,
                                      i.width, i.height
                               FROM prompts p JOIN images i ON i.image_id = p.image_id WHERE p.prompt_id = ?""",
                       [prompt_id])
    if prompt is None:
        return None
    cands, latest, pairwise = [], {}, []
    for r in fetch_all(cur, _ITEM_SQL, {"prompt": prompt_id, "round": round_id}):
        if r["kind"] == "c":
            cands.append({k: r[k] for k in ("candidate_id", "text", "origin", "view", "sample_index")})
        elif r["kind"] == "j":
            key = (r["candidate_id"], r["judge"])
            if key not in latest or r["created_at"] >= latest[key]["created_at"]:
                latest[key] = r
        else:
            pairwise.append({"judge": r["judge"], "first_id": r["candidate_id"], "second_id": r["second_id"],
                             "winner": r["winner"]})
    cands.sort(key=lambda c: (c["view"], c["sample_index"], c["candidate_id"]))
    judgments = [{k: r[k] for k in _JUDGMENT_KEYS} for _, r in sorted(latest.items())]
    return {"prompt": prompt, "candidates": cands, "judgments": judgments, "pairwise": pairwise}


# ---------------------------------------------------------------------------------------------- progress

def round_progress(cur: duckdb.DuckDBPyConnection, round_id: int, overlap: int, now: datetime) -> dict:
    """{queued, labelled (>= 1 decision), complete (>= overlap decisions), live_claims} of a round."""
    row = fetch_one(cur, """
        WITH c AS (SELECT prompt_id, count(*) FILTER (WHERE status = 'done') AS done,
                          count(*) FILTER (WHERE status = 'live' AND expires_at > $now) AS live
                   FROM review_claims WHERE round_id = $round GROUP BY prompt_id)
        SELECT count(*) FILTER (WHERE done >= 1) AS labelled, count(*) FILTER (WHERE done >= $overlap) AS complete,
               coalesce(sum(live), 0) AS live_claims FROM c""", {"round": round_id, "overlap": overlap, "now": now})
    row["queued"] = queue_size(cur, round_id)
    return row


def annotator_day(cur: duckdb.DuckDBPyConnection, annotator: str) -> dict:
    """Today's (database-local day) {labels, skips, active_seconds} of one annotator, undone labels excluded."""
    return fetch_one(cur, """
        SELECT count(*) FILTER (WHERE skipped_reason IS NULL) AS labels,
               count(*) FILTER (WHERE skipped_reason IS NOT NULL) AS skips,
               coalesce(sum(active_seconds), 0) AS active_seconds
        FROM (SELECT * FROM labels WHERE annotator = ?
              QUALIFY row_number() OVER (PARTITION BY round_id, prompt_id ORDER BY label_id DESC) = 1)
        WHERE kind = 'label' AND created_at >= CAST(current_date AS TIMESTAMP)""", [annotator])
