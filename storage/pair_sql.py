"""Pair strategies in SQL: a round's pairs built inside DuckDB, equal to the Python reference.

``build_pairs(cur, round_id, strategy, ...)`` runs ONE query over the round's candidates, judgments
and labels (the rows the Python path reads with ``storage.pairs.PAIRING_*_SQL``) and returns the pairs
as an Arrow table with the skip counts and the prompts for an admin (``storage.pairs.BuiltPairs``).
``backend.pairs`` is the reference and says which strategies have this path; ``tests/test_pair_sql.py``
checks on random workspaces that both give the same result. The rules, in the reference's order:

- human labels first: per prompt the latest label of each annotator votes (a skip or an empty label
  does not), the decision with the most votes wins, a tie between the top two drops the prompt for an
  admin (``annotator_tie``), "all bad" drops it (``all_bad``), a ranking expands to every ordered pair,
  a label naming a candidate the prompt does not have drops it (``label_names_unknown_candidate``);
- then imported preferences, by the same rules;
- then the strategy (``AI_SQL``) on the prompts left, each yielding pairs or one skip reason.

Two rules are shared with the reference rather than copied: best-vs-random's seeded pick (the smallest
``sha256('{seed}|{prompt_id}|{candidate_id}')``, ``backend.pairs.random_pick_key``) and SeVa's equal-answer
test (``core.text.normalize_answer``, registered as a DuckDB function for the query).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from core.text import normalize_answer
from storage.pairs import PAIR_COLUMNS, PAIR_SCHEMA, PAIRING_LABELS_SQL, BuiltPairs

log = logging.getLogger(__name__)

SCORE_COLUMNS = ("overall", "helpfulness", "correctness", "coherence", "complexity", "verbosity", "score")
"""The judgment columns a candidate's scores carry (``chosen_scores`` / ``rejected_scores``)."""
METRICS = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
"""The keys of ``rubric_delta`` (chosen minus rejected, where the rubric judge scored both)."""
AI_ORIGINS = "('policy', 'imported')"

# Each strategy is the CTE ``ai``: one row per pair (chosen_id, rejected_id, margin) or per skipped prompt
# (skip), over ``todo`` (the prompts no label decided). ``jnew`` holds $judge's newest ok judgment of each
# candidate. $judge, $min_margin and $seed are the options; {score} is best-worst's score (``j.<column>``,
# or NULL for a name that is no column); {norm} names SeVa's normalising function.
_BEST_WORST = """
scored AS (
    SELECT j.prompt_id, j.candidate_id, {score}::DOUBLE AS v
    FROM jnew j ANTI JOIN decided USING (prompt_id)
    WHERE j.origin IN """ + AI_ORIGINS + """ AND {score} IS NOT NULL),
agg AS (
    SELECT prompt_id, count(*) AS n, max(v) AS hi, min(v) AS lo,
           arg_min(candidate_id, {{'v': -v, 'id': candidate_id}}) AS best,
           arg_max(candidate_id, {{'v': -v, 'id': candidate_id}}) AS worst
    FROM scored GROUP BY prompt_id),
ai AS (
    SELECT t.prompt_id,
           CASE WHEN coalesce(a.n, 0) < 2 THEN 'fewer_than_two_scored' WHEN a.hi = a.lo THEN 'tie' END AS skip,
           a.best AS chosen_id, a.worst AS rejected_id, a.hi - a.lo AS margin
    FROM todo t LEFT JOIN agg a USING (prompt_id))"""

_BEST_VS_RANDOM = """
scored AS (
    SELECT j.prompt_id, j.candidate_id, j.helpfulness + j.correctness + j.coherence AS v
    FROM jnew j ANTI JOIN decided USING (prompt_id)
    WHERE j.origin IN """ + AI_ORIGINS + """
      AND j.helpfulness IS NOT NULL AND j.correctness IS NOT NULL AND j.coherence IS NOT NULL),
agg AS (
    SELECT prompt_id, count(*) AS n, max(v) AS top, min(v) AS low,
           arg_min(candidate_id, {{'v': -v, 'id': candidate_id}}) AS best
    FROM scored GROUP BY prompt_id),
pick AS (
    SELECT s.prompt_id,
           arg_min({{'id': s.candidate_id, 'm': a.top - s.v}},
                   {{'k': sha256($seed || '|' || s.prompt_id || '|' || s.candidate_id), 'id': s.candidate_id}}) AS p
    FROM scored s JOIN agg a USING (prompt_id)
    WHERE s.candidate_id <> a.best AND a.top - s.v >= $min_margin
    GROUP BY s.prompt_id),
ai AS (
    SELECT t.prompt_id,
           CASE WHEN coalesce(a.n, 0) < 2 THEN 'fewer_than_two_scored' WHEN p.p IS NOT NULL THEN NULL
                WHEN a.low = a.top THEN 'tie' ELSE 'below_margin' END AS skip,
           a.best AS chosen_id, p.p.id AS rejected_id, p.p.m AS margin
    FROM todo t LEFT JOIN agg a USING (prompt_id) LEFT JOIN pick p USING (prompt_id))"""

_SEVA = """
orig AS (
    SELECT c.prompt_id, arg_min(c.candidate_id, {{'i': c.sample_index, 'id': c.candidate_id}}) AS chosen_id
    FROM cands c SEMI JOIN todo USING (prompt_id)
    WHERE c.origin = 'policy' AND c.view = 'original' GROUP BY c.prompt_id),
aug AS (
    SELECT c.prompt_id, c.candidate_id, t.text
    FROM cands c SEMI JOIN todo USING (prompt_id) JOIN candidates t ON t.candidate_id = c.candidate_id
    WHERE c.origin = 'seva_augmented'),
chosen AS (
    SELECT o.prompt_id, o.chosen_id, {norm}(t.text) AS t
    FROM orig o JOIN candidates t ON t.candidate_id = o.chosen_id),
differ AS (
    SELECT a.prompt_id, ch.chosen_id, a.candidate_id AS rejected_id
    FROM aug a JOIN chosen ch USING (prompt_id) WHERE {norm}(a.text) <> ch.t),
ai AS (
    SELECT t.prompt_id,
           CASE WHEN o.prompt_id IS NULL THEN 'no_original_view'
                WHEN NOT EXISTS (SELECT 1 FROM aug a WHERE a.prompt_id = t.prompt_id) THEN 'no_augmented_view'
                ELSE 'equal_answers' END AS skip,
           NULL AS chosen_id, NULL AS rejected_id, NULL::DOUBLE AS margin
    FROM todo t LEFT JOIN orig o USING (prompt_id)
    WHERE NOT EXISTS (SELECT 1 FROM differ d WHERE d.prompt_id = t.prompt_id)
    UNION ALL
    SELECT prompt_id, NULL, chosen_id, rejected_id, NULL::DOUBLE FROM differ)"""

_HUMAN_ONLY = """
ai AS (SELECT prompt_id, 'no_label' AS skip, NULL AS chosen_id, NULL AS rejected_id, NULL::DOUBLE AS margin
       FROM todo)"""


AI_SQL: dict[str, str] = {
    "best-worst": _BEST_WORST,
    "best-vs-random": _BEST_VS_RANDOM,
    "seva": _SEVA,
    "human-only": _HUMAN_ONLY,
}
"""Strategy name (``backend.pairs.STRATEGIES`` entries with ``sql=True``) -> its ``ai`` CTE."""

NEEDS_JUDGE = ("best-worst", "best-vs-random")
"""Strategies that rank by ``judge``'s scores: without a judge they fail once a prompt reaches them."""
SOURCE = {"seva": "'seva'", "human-only": "'human-only'"}
"""The pairs' ``source`` per strategy (SQL); the others are named after the judge."""

# The candidates and judgments are those of storage.pairs.PAIRING_CANDIDATES_SQL / PAIRING_JUDGMENTS_SQL
# (the Python path's reads), written for speed: no answer text (SeVa joins it for its rows), and the newest
# ok judgment (by created_at, then judgment_id) only where it is needed: $judge's of every candidate
# (``jnew``: ranking, rubric delta, scores) and the other judges' of the candidates in a pair (``others``).
# A pair's ``chosen_scores`` / ``rejected_scores`` is the JSON object of both: judge -> its scores.
_QUERY = """
WITH
cands AS MATERIALIZED (
    SELECT c.candidate_id, c.prompt_id, c.origin, c.view, c.sample_index
    FROM candidates c SEMI JOIN prompts p ON p.prompt_id = c.prompt_id AND p.split = $split
    WHERE c.round_id = $round_id AND c.origin <> 'eval'),
jnew AS MATERIALIZED (
    SELECT c.prompt_id, c.origin, j.candidate_id, {columns}
    FROM judgments j JOIN cands c ON c.candidate_id = j.candidate_id
    WHERE j.status = 'ok' AND j.judge = $judge
    QUALIFY row_number() OVER (PARTITION BY j.candidate_id ORDER BY j.created_at DESC, j.judgment_id DESC) = 1),
lab AS (""" + PAIRING_LABELS_SQL + """),
items AS (SELECT DISTINCT prompt_id FROM cands),
votes AS (
    SELECT prompt_id, source,
           CASE WHEN skipped_reason IS NOT NULL THEN NULL
                WHEN all_bad THEN 'all_bad'
                WHEN coalesce(len(rk), 0) >= 2 THEN 'ranking'
                WHEN coalesce(chosen_id, '') <> '' AND coalesce(rejected_id, '') <> ''
                     AND chosen_id <> rejected_id THEN 'pair' END AS kind,
           CASE WHEN kind = 'ranking' THEN rk WHEN kind = 'pair' THEN [chosen_id, rejected_id]
                ELSE []::VARCHAR[] END AS ids
    FROM (SELECT *, from_json(ranking, '["VARCHAR"]') AS rk FROM lab) SEMI JOIN items USING (prompt_id)),
tally AS (SELECT prompt_id, source, kind, ids, count(*) AS n FROM votes WHERE kind IS NOT NULL GROUP BY ALL),
tops AS (
    SELECT t.prompt_id, t.source, count(*) AS k, any_value(t.kind) AS kind, any_value(t.ids) AS ids
    FROM tally t JOIN (SELECT prompt_id, source, max(n) AS n FROM tally GROUP BY ALL) m USING (prompt_id, source, n)
    GROUP BY t.prompt_id, t.source),
decided AS (
    SELECT prompt_id, source, ids,
           CASE WHEN k > 1 THEN 'annotator_tie' WHEN kind = 'all_bad' THEN 'all_bad'
                WHEN EXISTS (SELECT 1 FROM unnest(ids) u(cid)
                             WHERE NOT EXISTS (SELECT 1 FROM cands c
                                               WHERE c.prompt_id = tops.prompt_id AND c.candidate_id = u.cid))
                THEN 'label_names_unknown_candidate' END AS skip
    FROM tops QUALIFY row_number() OVER (PARTITION BY prompt_id ORDER BY source) = 1),
labelled AS (
    SELECT d.prompt_id, d.ids[a.i] AS chosen_id, d.ids[b.j] AS rejected_id, d.source
    FROM decided d,
         LATERAL (SELECT unnest(generate_series(1, len(d.ids))) AS i) a,
         LATERAL (SELECT unnest(generate_series(a.i + 1, len(d.ids))) AS j) b
    WHERE d.skip IS NULL),
todo AS (SELECT prompt_id FROM items ANTI JOIN decided USING (prompt_id)),
{ai},
made AS (
    SELECT prompt_id, chosen_id, rejected_id, source, source AS strategy, NULL::DOUBLE AS margin, false AS rubric
    FROM labelled
    UNION ALL
    SELECT prompt_id, chosen_id, rejected_id, {source}, $strategy, margin, true FROM ai WHERE skip IS NULL),
others AS (
    SELECT candidate_id, string_agg(to_json(judge) || ':' || to_json(s), ',') AS members
    FROM (SELECT j.candidate_id, j.judge, {{{score_fields}}} AS s
          FROM judgments j SEMI JOIN (SELECT chosen_id AS candidate_id FROM made
                                      UNION SELECT rejected_id FROM made) USING (candidate_id)
          WHERE j.status = 'ok' AND j.judge IS DISTINCT FROM $judge
          QUALIFY row_number() OVER (PARTITION BY j.candidate_id, j.judge
                                     ORDER BY j.created_at DESC, j.judgment_id DESC) = 1)
    GROUP BY candidate_id)
SELECT $round_id::INTEGER AS round_id, m.prompt_id, m.chosen_id, m.rejected_id, m.source, m.strategy, m.margin,
       CASE WHEN m.rubric AND jc.candidate_id IS NOT NULL AND jr.candidate_id IS NOT NULL
            THEN nullif('{{' || concat_ws(',', {delta_fields}) || '}}', '{{}}') END AS rubric_delta,
       {chosen_scores} AS chosen_scores, {rejected_scores} AS rejected_scores, NULL::VARCHAR AS skip
FROM made m
LEFT JOIN jnew jc ON jc.candidate_id = m.chosen_id
LEFT JOIN jnew jr ON jr.candidate_id = m.rejected_id
LEFT JOIN others oc ON oc.candidate_id = m.chosen_id
LEFT JOIN others orj ON orj.candidate_id = m.rejected_id
UNION ALL
SELECT NULL, prompt_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, skip FROM decided WHERE skip IS NOT NULL
UNION ALL
SELECT NULL, prompt_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, skip FROM ai WHERE skip IS NOT NULL
ORDER BY prompt_id, chosen_id, rejected_id  -- in key order the insert checks its keys faster
"""


def query(strategy: str, score: str = "overall", norm: str = "") -> str:
    """The SQL of one strategy (its ``ai`` CTE inside the shared label rules); ``norm`` names SeVa's function."""
    column = f"j.{score}" if score in SCORE_COLUMNS else "NULL"  # the reference's s.get(score): None
    return _QUERY.format(
        ai=AI_SQL[strategy].format(score=column, norm=norm), source=SOURCE.get(strategy, "$judge"),
        columns=", ".join(f"j.{c}" for c in SCORE_COLUMNS),
        score_fields=", ".join(f"'{c}': j.{c}" for c in SCORE_COLUMNS),
        delta_fields=", ".join(f"""'"{m}":' || to_json(jc.{m} - jr.{m})""" for m in METRICS),
        chosen_scores=_scores_json("jc", "oc"), rejected_scores=_scores_json("jr", "orj"))


def _scores_json(mine: str, others: str) -> str:
    """A candidate's scores as JSON: $judge's (from ``jnew``) and the other judges' members, or NULL."""
    struct = ", ".join(f"'{c}': {mine}.{c}" for c in SCORE_COLUMNS)
    return (f"nullif('{{' || concat_ws(',', CASE WHEN {mine}.candidate_id IS NOT NULL "
            f"THEN to_json($judge) || ':' || to_json({{{struct}}}) END, {others}.members) || '}}', '{{}}')")


@contextmanager
def _normalizer(cur: duckdb.DuckDBPyConnection) -> Iterator[str]:
    """``core.text.normalize_answer`` registered as a DuckDB function under a unique name (removed after)."""
    name = f"prefloop_norm_{uuid.uuid4().hex[:12]}"

    def norm(texts: pa.Array) -> pa.Array:
        return pa.array([None if t is None else normalize_answer(t) for t in texts.to_pylist()], pa.string())

    cur.create_function(name, norm, ["VARCHAR"], "VARCHAR", type="arrow")
    try:
        yield name
    finally:
        cur.remove_function(name)


def build_pairs(cur: duckdb.DuckDBPyConnection, round_id: int, strategy: str, *, judge: str | None,
                score: str = "overall", min_margin: float = 2.0, seed: int = 0,
                prompt_split: str = "train") -> BuiltPairs:
    """The round's pairs by ``strategy`` (a key of ``AI_SQL``), human and imported labels first."""
    params = {"round_id": round_id, "split": prompt_split, "judge": judge,
              "min_margin": float(min_margin), "seed": str(seed), "strategy": strategy}
    q = cur.cursor()  # its own connection: free of results the caller left unfinished on ``cur``
    try:
        with _normalizer(q) if strategy == "seva" else nullcontext("") as norm:
            sql = query(strategy, score, norm)
            table = q.sql(sql, params={k: v for k, v in params.items() if f"${k}" in sql}).to_arrow_table()
    finally:
        q.close()
    is_pair = pc.is_null(table.column("skip"))
    skips = table.filter(pc.invert(is_pair)).select(["prompt_id", "skip"])
    if strategy in NEEDS_JUDGE and not judge and pc.any(pc.is_in(
            skips.column("skip"), pa.array(["fewer_than_two_scored"]))).as_py():
        raise ValueError(f"the {strategy} strategy needs a judge (pairs.judge in prefloop.toml or --judge)")
    skipped = {c["values"]: c["counts"] for c in pc.value_counts(skips.column("skip")).to_pylist()} \
        if skips.num_rows else {}
    admin = skips.filter(pc.equal(skips.column("skip"), "annotator_tie")).column("prompt_id").to_pylist()
    pairs = table.filter(is_pair).select(list(PAIR_COLUMNS)).cast(PAIR_SCHEMA)
    prompts = pc.count_distinct(table.column("prompt_id")).as_py() if table.num_rows else 0
    log.info("pairs (%s, in SQL): %d pairs from %d prompts", strategy, pairs.num_rows, prompts)
    return BuiltPairs(table=pairs, skipped=skipped, needs_admin=sorted(admin), prompts=prompts, path="sql")
