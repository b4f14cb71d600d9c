"""The SQL pair strategies (storage.pair_sql) give exactly the pairs of the Python reference (backend.pairs).

A property test writes random workspaces into DuckDB: prompts with 0-5 candidates of every origin and
view (other rounds, held-out prompts, eval answers), answers that differ only by whitespace or case
(Unicode too), judgments from two judges with ties, missing metrics, margins exactly at the threshold,
newer and invalid judgments, and labels from several annotators (majorities, ties, undos, skips, all
bad, rankings, unknown candidates, imported preferences). For every strategy and options, both paths
must give the same pairs (provenance, margin, scores and rubric delta included), the same skip counts
and the same prompts for an admin, or the same error.
"""

from __future__ import annotations

import datetime
import json

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.pairs import STRATEGIES, PairOptions, Strategy, build_pairs
from backend.steps.pairs import build_round_pairs, read_items
from storage import migrations, pair_sql

TEXTS = ("A red ball.", "  a RED   ball. ", "A blue ball.", "Straße", "STRASSE", "ΑΣ", "ας", "x\u2003y", "x y")
METRIC = st.sampled_from([None, 2.0, 3.0, 4.0, 4.0, 3.0, 2.0, 0.5])
JUDGES = ("gemini", "critic")
T0 = datetime.datetime(2026, 1, 1)


@st.composite
def workspaces(draw):
    """Rows of images, prompts, candidates, judgments and labels (as insert-ready tuples)."""
    prompts, cands, judgments, labels = [], [], [], []
    clock = iter(range(10_000))
    for p in range(draw(st.integers(1, 6))):
        pid = f"p{p}"
        prompts.append((pid, "heldout" if draw(st.integers(0, 9)) == 0 else "train"))
        ids, texts = [], draw(st.lists(st.sampled_from(TEXTS), min_size=1, max_size=3))
        for i in range(draw(st.sampled_from([0, 1, 2, 3, 4, 5, 5, 5]))):
            cid = f"{pid}c{draw(st.sampled_from('abcdef'))}{i}"
            origin = draw(st.sampled_from(["policy"] * 6 + ["imported", "seva_augmented", "seva_augmented", "eval"]))
            view = "original" if origin != "seva_augmented" and draw(st.integers(0, 4)) else "aug:flip"
            rnd = 1 if draw(st.integers(0, 9)) else 2
            cands.append((cid, pid, rnd, draw(st.sampled_from(texts)), origin, view, draw(st.integers(0, 2))))
            ids.append(cid)
            for judge in JUDGES:
                for _ in range(draw(st.sampled_from([0, 1, 1, 2]))):
                    status = "ok" if draw(st.integers(0, 4)) else "invalid"
                    h, c, coh, cx, vb = (draw(METRIC) for _ in range(5))
                    overall = draw(st.sampled_from([None, 0.25, 0.5, 0.5, 1.0, 0.1 + 0.2]))
                    score = draw(st.sampled_from([None, 10.0, 50.0, 50.5]))
                    judgments.append((f"j{len(judgments)}", cid, judge, h, c, coh, cx, vb, score, overall, status,
                                      T0 + datetime.timedelta(seconds=next(clock))))
        names = ids + ["zz"] if not ids or draw(st.integers(0, 4)) == 0 else ids  # zz: no such candidate
        decisions = draw(st.lists(decision(names), min_size=1, max_size=3))  # few, so that votes collide
        for _ in range(draw(st.sampled_from([0, 0, 1, 2, 2, 3, 4]))):
            source = "imported" if draw(st.integers(0, 3)) == 0 else "human"
            annotator = draw(st.sampled_from(["ann1", "ann2", "ann3"])) if source == "human" else "import"
            labels.append((pid, source, annotator, draw(st.sampled_from(["label"] * 5 + ["undo"])),
                           *draw(st.sampled_from(decisions)), "unsure" if draw(st.integers(0, 7)) == 0 else None))
    return prompts, cands, judgments, labels


def decision(names: list[str]):
    """A label's (chosen_id, rejected_id, ranking JSON, all_bad): a pair, a ranking, all bad or nothing."""
    name = st.sampled_from([None, *names])
    ranking = st.lists(st.sampled_from(names), unique=True, max_size=3).map(json.dumps)
    return st.one_of(st.tuples(st.sampled_from(names), st.sampled_from(names), st.none(), st.just(False)),
                     st.tuples(st.none(), st.none(), ranking, st.just(False)),
                     st.tuples(name, name, st.one_of(st.none(), ranking), st.booleans()))


OPTIONS = st.builds(PairOptions, judge=st.sampled_from([*JUDGES, *JUDGES, None]),
                    score=st.sampled_from(["overall", "helpfulness", "score", "bogus"]),
                    min_margin=st.sampled_from([2.0, 1.0, 0.0, 2.5, -1.0]), seed=st.integers(-5, 10**6))


@pytest.fixture(scope="module")
def con():
    c = duckdb.connect(":memory:")
    migrations.migrate(c)
    yield c
    c.close()


def _insert(con, table: str, columns: str, rows: list[tuple]) -> None:
    """One INSERT of all ``rows`` (executemany runs one statement per row)."""
    if rows:
        width = len(rows[0])
        values = ", ".join("(" + ", ".join("?" * width) + ")" for _ in rows)
        con.execute(f"INSERT INTO {table} ({columns}) VALUES {values}", [v for row in rows for v in row])


def write(con, ws) -> None:
    prompts, cands, judgments, labels = ws
    for table in ("pairs", "labels", "judgments", "candidates", "prompts", "images"):
        con.execute(f"DELETE FROM {table}")
    _insert(con, "images", "image_id, path, width, height, format, n_bytes", [("img", "images/i.png", 1, 1, "PNG", 1)])
    _insert(con, "prompts", "prompt_id, image_id, question, source, split",
            [(p, "img", f"q {p}", "t", split) for p, split in prompts])
    _insert(con, "candidates", "candidate_id, prompt_id, round_id, text, origin, view, sample_index", cands)
    _insert(con, "judgments", "judgment_id, candidate_id, judge, helpfulness, correctness, coherence, complexity, "
            "verbosity, score, overall, status, created_at, judge_version", [(*j, "v1") for j in judgments])
    _insert(con, "labels", "prompt_id, source, annotator, kind, chosen_id, rejected_id, ranking, all_bad, "
            "skipped_reason, round_id", [(*lb, 1) for lb in labels])


def _js(text):
    return None if text is None else json.loads(text)


def outcome(built) -> dict:
    """A path's result as plain data: pairs (sorted, JSON parsed), skip counts, admin list, prompts."""
    rows = built.table.to_pylist()
    pairs = sorted((r["round_id"], r["prompt_id"], r["chosen_id"], r["rejected_id"], r["source"], r["strategy"],
                    r["margin"], json.dumps(_js(r["rubric_delta"]), sort_keys=True),
                    json.dumps(_js(r["chosen_scores"]), sort_keys=True),
                    json.dumps(_js(r["rejected_scores"]), sort_keys=True)) for r in rows)
    return {"pairs": pairs, "skipped": built.skipped, "needs_admin": built.needs_admin, "prompts": built.prompts}


def both(con, strategy: str, opts: PairOptions) -> tuple:
    results = []
    for sql in (False, True):
        STRATEGIES_SQL = {**STRATEGIES, strategy: Strategy(STRATEGIES[strategy].python, sql=sql)}
        try:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr("backend.steps.pairs.STRATEGIES", STRATEGIES_SQL)
                built = build_round_pairs(con, 1, strategy, opts)
            assert built.path == ("sql" if sql else "python")
            results.append(outcome(built))
        except ValueError as err:
            results.append(f"ValueError: {err}")
    return tuple(results)


@settings(max_examples=100, deadline=None)
@given(ws=workspaces(), opts=OPTIONS)
def test_sql_pairs_equal_the_python_reference(con, ws, opts):
    write(con, ws)
    for strategy in STRATEGIES:
        python, sql = both(con, strategy, opts)
        assert sql == python, strategy


def test_hand_made_edge_cases_agree(con):
    """Ties, a margin exactly at the threshold, single candidates, overrides and annotator ties, all at once."""
    def metrics(h, c, coh, overall):
        return (h, c, coh, None, None, None, overall, "ok")

    cands = [("tie_a", "tie", "policy", "original"), ("tie_b", "tie", "policy", "original"),
             ("one", "single", "policy", "original"),
             ("m_top", "margin", "policy", "original"), ("m_at", "margin", "policy", "original"),
             ("m_near", "margin", "policy", "original"),
             ("h_a", "human", "policy", "original"), ("h_b", "human", "policy", "original"),
             ("t_a", "tied", "policy", "original"), ("t_b", "tied", "policy", "original")]
    scores = {"tie_a": metrics(2, 2, 2, 0.5), "tie_b": metrics(2, 2, 2, 0.5), "one": metrics(4, 4, 4, 1.0),
              "m_top": metrics(4, 4, 4, 1.0), "m_at": metrics(3, 3, 4, 0.5), "m_near": metrics(4, 3, 4, 0.75),
              "h_a": metrics(4, 4, 4, 1.0), "h_b": metrics(0, 0, 0, 0.0),
              "t_a": metrics(4, 4, 4, 1.0), "t_b": metrics(0, 0, 0, 0.0)}
    labels = [("human", "human", "ann1", "label", "h_b", "h_a", None, False, None),
              ("tied", "human", "ann1", "label", "t_b", "t_a", None, False, None),
              ("tied", "human", "ann2", "label", None, None, None, True, None)]
    ws = ([(p, "train") for p in sorted({c[1] for c in cands})],
          [(cid, pid, 1, f"answer {cid}", origin, view, 0) for cid, pid, origin, view in cands],
          [(f"j{i}", cid, "gemini", *s[:6], s[6], s[7], T0) for i, (cid, s) in enumerate(scores.items())],
          labels)
    write(con, ws)
    for strategy in ("best-worst", "best-vs-random"):
        python, sql = both(con, strategy, PairOptions(judge="gemini", min_margin=2.0))
        assert sql == python
    *_, sql = both(con, "best-vs-random", PairOptions(judge="gemini", min_margin=2.0))
    got = {p[1]: (p[2], p[3], p[4], p[6]) for p in sql["pairs"]}
    assert got["margin"] == ("m_top", "m_at", "gemini", 2.0), "a margin exactly at min_margin is eligible"
    assert got["human"] == ("h_b", "h_a", "human", None), "the human label overrides the judge"
    assert sql["skipped"] == {"tie": 1, "fewer_than_two_scored": 1, "annotator_tie": 1}
    assert sql["needs_admin"] == ["tied"]


def test_best_vs_random_seeded_pick_agrees_and_varies(con):
    """Many eligible candidates: the shared hash order picks the same one in both paths, per seed."""
    cands = [("top", 4.0)] + [(f"x{i}", 1.0 + (i % 2)) for i in range(6)]
    write(con, ([("p", "train"), ("q", "train")],
                [(f"{p}{cid}", p, 1, cid, "policy", "original", 0) for p in "pq" for cid, _ in cands],
                [(f"j{p}{cid}", f"{p}{cid}", "gemini", v, v, v, None, None, None, None, "ok", T0)
                 for p in "pq" for cid, v in cands], []))
    picks = set()
    for seed in range(25):
        python, sql = both(con, "best-vs-random", PairOptions(judge="gemini", seed=seed))
        assert sql == python
        picks.add(tuple(p[3] for p in sql["pairs"]))
    assert len(picks) > 5, "the pick changes with the seed (and differs between prompts)"


def test_every_strategy_has_a_sql_path_and_the_registry_says_so():
    assert {k for k, v in STRATEGIES.items() if v.sql} == set(pair_sql.AI_SQL)
    assert set(pair_sql.AI_SQL) <= set(STRATEGIES)


def test_a_missing_judge_fails_like_the_reference_only_when_a_prompt_needs_it(con):
    ws = ([("p", "train")], [("a", "p", 1, "x", "policy", "original", 0), ("b", "p", 1, "y", "policy", "original", 1)],
          [], [("p", "human", "ann1", "label", "a", "b", None, False, None)])
    write(con, ws)
    python, sql = both(con, "best-worst", PairOptions(judge=None))
    assert python == sql and sql["pairs"][0][1:5] == ("p", "a", "b", "human")
    con.execute("DELETE FROM labels")
    python, sql = both(con, "best-worst", PairOptions(judge=None))
    assert python == sql == "ValueError: the best-worst strategy needs a judge (pairs.judge in prefloop.toml or --judge)"
    assert read_items(con, 1)[0].prompt_id == "p"
    assert build_pairs([], "best-worst").pairs == []
