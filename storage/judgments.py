"""Judgments and pairwise verdicts: what is still to judge, writing a batch in ONE transaction, reads.

A judgment row is one candidate scored by one (judge, judge_version). Its id is deterministic
(``judgment_id(candidate, judge, version)``), so judging a candidate again with the same judge and
version replaces its row (``--retry-invalid``, or a pairwise re-run after new candidates arrived)
instead of piling up duplicates. Invalid and error rows are stored too, with the raw output, so
they are not judged again unless asked.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import duckdb
import pyarrow as pa

from storage.db import fetch_all, scalar, transaction

JUDGMENT_SCHEMA = pa.schema([
    ("judgment_id", pa.string()), ("candidate_id", pa.string()), ("judge", pa.string()),
    ("judge_version", pa.string()), ("helpfulness", pa.float64()), ("correctness", pa.float64()),
    ("coherence", pa.float64()), ("complexity", pa.float64()), ("verbosity", pa.float64()),
    ("score", pa.float64()), ("overall", pa.float64()), ("reasoning", pa.string()), ("raw_output", pa.string()),
    ("status", pa.string()), ("latency_ms", pa.float64()), ("tokens_in", pa.int32()), ("tokens_out", pa.int32()),
])
PAIRWISE_SCHEMA = pa.schema([
    ("judge", pa.string()), ("judge_version", pa.string()), ("first_id", pa.string()), ("second_id", pa.string()),
    ("winner", pa.string()), ("status", pa.string()), ("raw_output", pa.string()),
])
SCORE_COLUMNS = ("helpfulness", "correctness", "coherence", "complexity", "verbosity", "score", "overall")


def judgment_id(candidate_id: str, judge: str, judge_version: str) -> str:
    """Deterministic id of a candidate's judgment by (judge, version)."""
    return hashlib.sha256(f"judgment\x1f{candidate_id}\x1f{judge}\x1f{judge_version}".encode()).hexdigest()[:20]


@contextmanager
def _registered(cur: duckdb.DuckDBPyConnection, rows: list[dict], schema: pa.Schema) -> Iterator[str]:
    name = f"_judg_{uuid.uuid4().hex}"
    cur.register(name, pa.Table.from_pylist(rows, schema=schema))
    try:
        yield name
    finally:
        cur.unregister(name)


# ---------------------------------------------------------------------------------------------- to judge

def candidates_to_judge(cur: duckdb.DuckDBPyConnection, round_id: int, judge: str, judge_version: str,
                        workspace_root: str, *, retry_invalid: bool = False, whole_prompt: bool = False,
                        limit: int | None = None) -> list[dict]:
    """Prompts of a round with candidates that have no judgment yet from (judge, judge_version).

    A candidate counts as judged when it has a row from this judge and version (any status; with
    ``retry_invalid`` only an ``ok`` row counts). Returns one dict per prompt (at most ``limit``,
    in prompt order): prompt_id, question, image_id, image_path (absolute), reference, and
    ``candidates`` [{candidate_id, text}] - only the unjudged ones, or with ``whole_prompt`` every
    candidate of the prompt in the round (for judges that compare candidates with each other).
    Eval candidates (origin ``eval``) are left to the eval step.
    """
    rows = fetch_all(cur, """
        WITH cands AS (
            SELECT c.candidate_id, c.prompt_id, c.text, c.view, c.sample_index,
                   EXISTS (SELECT 1 FROM judgments j
                           WHERE j.candidate_id = c.candidate_id AND j.judge = ? AND j.judge_version = ?
                             AND (NOT ? OR j.status = 'ok')) AS judged
            FROM candidates c WHERE c.round_id = ? AND c.origin <> 'eval')
        SELECT p.prompt_id, p.question, p.image_id, ? || '/' || i.path AS image_path, p.reference,
               c.candidate_id, c.text, c.judged, p.created_at
        FROM cands c JOIN prompts p ON p.prompt_id = c.prompt_id JOIN images i ON i.image_id = p.image_id
        WHERE c.prompt_id IN (SELECT prompt_id FROM cands WHERE NOT judged)
        ORDER BY p.created_at, p.prompt_id, c.view, c.sample_index, c.candidate_id""",
        [judge, judge_version, retry_invalid, round_id, workspace_root])
    prompts: dict[str, dict] = {}
    for r in rows:
        p = prompts.get(r["prompt_id"])
        if p is None:
            if limit is not None and len(prompts) >= limit:
                break
            p = prompts[r["prompt_id"]] = {k: r[k] for k in ("prompt_id", "question", "image_id", "image_path",
                                                             "reference")} | {"candidates": []}
        if whole_prompt or not r["judged"]:
            p["candidates"].append({"candidate_id": r["candidate_id"], "text": r["text"]})
    return list(prompts.values())


# ---------------------------------------------------------------------------------------------- writes

def write_judgments(cur: duckdb.DuckDBPyConnection, judgments: list[dict], pairwise: list[dict]) -> dict[str, int]:
    """Write judgment rows (keys of JUDGMENT_SCHEMA) and pairwise verdicts in ONE transaction.

    Rows replace earlier rows with the same judgment_id / (judge, version, first, second). Returns
    the counts written.
    """
    with transaction(cur):
        if judgments:
            cols = ", ".join(JUDGMENT_SCHEMA.names)
            with _registered(cur, judgments, JUDGMENT_SCHEMA) as name:
                cur.execute(f"DELETE FROM judgments WHERE judgment_id IN (SELECT judgment_id FROM {name})")
                cur.execute(f"INSERT INTO judgments ({cols}) SELECT {cols} FROM {name}")
        if pairwise:
            cols = ", ".join(PAIRWISE_SCHEMA.names)
            with _registered(cur, pairwise, PAIRWISE_SCHEMA) as name:
                cur.execute(f"""DELETE FROM pairwise_verdicts v USING {name} n
                                WHERE v.judge = n.judge AND v.judge_version = n.judge_version
                                  AND v.first_id = n.first_id AND v.second_id = n.second_id""")
                cur.execute(f"INSERT INTO pairwise_verdicts ({cols}) SELECT {cols} FROM {name}")
    return {"judgments": len(judgments), "pairwise_verdicts": len(pairwise)}


# ---------------------------------------------------------------------------------------------- reads

def list_judgments(cur: duckdb.DuckDBPyConnection, *, judge: str | None = None, judge_version: str | None = None,
                   round_id: int | None = None, prompt_id: str | None = None,
                   status: str | None = None) -> list[dict]:
    """Judgment rows (with the candidate's prompt_id and round_id), filtered by any of the arguments."""
    return fetch_all(cur, """
        SELECT j.*, c.prompt_id, c.round_id
        FROM judgments j JOIN candidates c ON c.candidate_id = j.candidate_id
        WHERE (? IS NULL OR j.judge = ?) AND (? IS NULL OR j.judge_version = ?)
          AND (? IS NULL OR c.round_id = ?) AND (? IS NULL OR c.prompt_id = ?) AND (? IS NULL OR j.status = ?)
        ORDER BY c.prompt_id, c.view, c.sample_index, j.judge, j.judge_version""",
        [judge, judge, judge_version, judge_version, round_id, round_id, prompt_id, prompt_id, status, status])


def candidate_scores(cur: duckdb.DuckDBPyConnection, candidate_ids: list[str]) -> dict[str, dict[str, dict]]:
    """{candidate_id: {"judge:version": {metric: value, ..., "status", "reasoning"}}} for the review UI."""
    if not candidate_ids:
        return {}
    rows = fetch_all(cur, f"""
        SELECT candidate_id, judge, judge_version, status, reasoning, {', '.join(SCORE_COLUMNS)}
        FROM judgments WHERE candidate_id IN (SELECT unnest(?)) ORDER BY judge, judge_version""",
        [list(candidate_ids)])
    out: dict[str, dict[str, dict]] = {}
    for r in rows:
        key = f"{r.pop('judge')}:{r.pop('judge_version')}"
        out.setdefault(r.pop("candidate_id"), {})[key] = r
    return out


def list_pairwise_verdicts(cur: duckdb.DuckDBPyConnection, judge: str, judge_version: str,
                           candidate_ids: list[str] | None = None) -> list[dict]:
    """Ordered pairwise verdicts of one judge version, optionally only those among ``candidate_ids``."""
    return fetch_all(cur, """
        SELECT * FROM pairwise_verdicts
        WHERE judge = ? AND judge_version = ?
          AND (?::VARCHAR[] IS NULL OR (first_id IN (SELECT unnest(?::VARCHAR[]))
                                        AND second_id IN (SELECT unnest(?::VARCHAR[]))))
        ORDER BY first_id, second_id""",
        [judge, judge_version, candidate_ids, candidate_ids, candidate_ids])


def judgment_counts(cur: duckdb.DuckDBPyConnection, round_id: int | None = None) -> list[dict]:
    """Rows per (judge, judge_version, status), optionally for one round's candidates."""
    return fetch_all(cur, """
        SELECT j.judge, j.judge_version, j.status, count(*) AS n
        FROM judgments j JOIN candidates c ON c.candidate_id = j.candidate_id
        WHERE (? IS NULL OR c.round_id = ?)
        GROUP BY ALL ORDER BY ALL""", [round_id, round_id])


def count_judgments(cur: duckdb.DuckDBPyConnection, judge: str | None = None) -> int:
    return scalar(cur, "SELECT count(*) FROM judgments WHERE (? IS NULL OR judge = ?)", [judge, judge])


def scored_candidates(cur: duckdb.DuckDBPyConnection, round_id: int, judge: str, workspace_root: str) -> list[dict]:
    """The round's candidates on train prompts (not eval answers) with ``judge``'s newest `ok` judgment that
    rates all five HelpSteer attributes: prompt_id, candidate_id, image_path (absolute), question, text and the
    five values, in prompt order (SteerLM's training rows)."""
    return fetch_all(cur, """
        SELECT c.prompt_id, c.candidate_id, ? || '/' || i.path AS image_path, p.question, c.text,
               j.helpfulness, j.correctness, j.coherence, j.complexity, j.verbosity
        FROM candidates c
        JOIN prompts p ON p.prompt_id = c.prompt_id
        JOIN images i ON i.image_id = p.image_id
        JOIN (SELECT *, row_number() OVER (PARTITION BY candidate_id ORDER BY created_at DESC) AS rn
              FROM judgments
              WHERE judge = ? AND status = 'ok' AND helpfulness IS NOT NULL AND correctness IS NOT NULL
                AND coherence IS NOT NULL AND complexity IS NOT NULL AND verbosity IS NOT NULL) j
          ON j.candidate_id = c.candidate_id AND j.rn = 1
        WHERE c.round_id = ? AND c.origin <> 'eval' AND p.split = 'train'
        ORDER BY c.prompt_id, c.view, c.sample_index, c.candidate_id""", [workspace_root, judge, round_id])
