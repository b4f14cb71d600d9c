"""prefloop agreement: rank correlation, best/worst agreement, judges vs humans, most-disagreed prompts."""

from __future__ import annotations

import json

import pytest

from backend.agreement import (
    agreement_report,
    best_worst_agreement,
    disagreement_prompts,
    human_agreement,
    rank_agreement,
)
from storage import agreement as agstore
from storage import images as images_db
from storage import judgments as jstore
from storage import prompts as prompts_db
from storage import rounds
from storage.workspace import init_workspace
from tests.helpers import make_image, run_cli

# Two prompts x three candidates. Judge "same" scores exactly like "base"; "reversed" the other way round.
BASE = {"p1-0": 0.9, "p1-1": 0.5, "p1-2": 0.1, "p2-0": 0.2, "p2-1": 0.6, "p2-2": 0.8}


def score_rows() -> list[dict]:
    rows = []
    for judge, f in (("base", lambda v: v), ("same", lambda v: v), ("reversed", lambda v: 1 - v)):
        for cid, v in BASE.items():
            rows.append({"round_id": 1, "prompt_id": cid.split("-")[0], "candidate_id": cid, "judge": judge,
                         "judge_version": "v1", "overall": f(v), "helpfulness": None, "correctness": None,
                         "coherence": None, "complexity": None, "verbosity": None, "score": None})
    return rows


def test_rank_correlation_identical_and_reversed():
    by_pair = {(r["judge_a"], r["judge_b"]): r for r in rank_agreement(score_rows()) if r["metric"] == "overall"}
    same = by_pair[("base:v1", "same:v1")]
    rev = by_pair[("base:v1", "reversed:v1")]
    assert same["n"] == 6 and same["spearman"] == pytest.approx(1.0) and same["kendall"] == pytest.approx(1.0)
    assert rev["spearman"] == pytest.approx(-1.0) and rev["kendall"] == pytest.approx(-1.0)
    # metrics nobody produced are not reported; a constant judge has no defined correlation
    assert {r["metric"] for r in rank_agreement(score_rows())} == {"overall"}
    flat = [dict(r, overall=0.5) if r["judge"] == "same" else r for r in score_rows()]
    flat_pair = next(r for r in rank_agreement(flat) if r["judge_b"] == "same:v1")
    assert flat_pair["spearman"] is None and flat_pair["kendall"] is None


def test_best_worst_agreement():
    bw = {(r["judge_a"], r["judge_b"]): r for r in best_worst_agreement(score_rows())}
    assert bw[("base:v1", "same:v1")]["same_best"] == 1.0 and bw[("base:v1", "same:v1")]["same_worst"] == 1.0
    rev = bw[("base:v1", "reversed:v1")]
    assert (rev["prompts"], rev["same_best"], rev["same_worst"]) == (2, 0.0, 0.0)


def test_human_label_contradicting_one_judge():
    labels = [{"round_id": 1, "prompt_id": "p1", "annotator": "ann", "source": "human",
               "chosen_id": "p1-0", "rejected_id": "p1-2"}]
    h = {r["judge"]: r for r in human_agreement(score_rows(), labels)}
    assert h["base:v1"]["contradicts"] == 0 and h["base:v1"]["disagree"] == 0
    assert h["reversed:v1"]["contradicts"] == 1 and h["reversed:v1"]["contradiction_rate"] == 1.0
    assert h["reversed:v1"]["disagree"] == 1 and h["reversed:v1"]["labels_with_pair"] == 1


def test_ties_inside_the_judges_best_set_are_no_contradiction():
    rows = [{"round_id": 1, "prompt_id": "p", "candidate_id": c, "judge": "ref", "judge_version": "v1", "overall": v}
            for c, v in (("a", 1.0), ("b", 1.0), ("c", 0.0))]

    def label(chosen, rejected):
        return {"round_id": 1, "prompt_id": "p", "annotator": chosen, "chosen_id": chosen, "rejected_id": rejected}

    [tie] = human_agreement(rows, [label("a", "b")])
    assert (tie["contradicts"], tie["disagree"]) == (0, 0)
    [against] = human_agreement(rows, [label("c", "b"), label("a", "c")])
    assert (against["contradicts"], against["labels_with_pair"], against["disagree"]) == (1, 2, 1)


def test_disagreement_ranks_prompts():
    rows = score_rows()
    rows = [dict(r, overall=BASE[r["candidate_id"]]) if r["judge"] == "reversed" and r["prompt_id"] == "p2" else r
            for r in rows]   # on p2 every judge agrees now
    top = disagreement_prompts(rows, top=5)
    assert [t["prompt_id"] for t in top] == ["p1", "p2"]
    assert top[1]["disagreement"] == pytest.approx(0.0) and top[0]["disagreement"] > 0.3
    assert top[0]["best"]["base:v1"] == ["p1-0"] and top[0]["best"]["reversed:v1"] == ["p1-2"]
    assert len(disagreement_prompts(rows, top=1)) == 1


def build_workspace(tmp_path):
    """A hand-made database: two prompts x three candidates, judges a (= base) and b (reversed), a human label."""
    ws = init_workspace(tmp_path / "ws")
    cur = ws.cursor()
    rounds.ensure_first_round(cur, base_model="tiny")
    imgs, prompts, cands = [], [], []
    for n, pid in enumerate(("p1", "p2")):
        data = make_image(tmp_path / f"{pid}.png", color=(90 * n, 20, 20)).read_bytes()
        sha = images_db.sha256_hex(data)
        rel = images_db.store_relpath(sha, "PNG")
        images_db.write_atomic(ws.root / rel, data)
        imgs.append({"image_id": sha, "path": rel, "width": 48, "height": 40, "format": "PNG", "n_bytes": len(data)})
        prompts.append({"prompt_id": pid, "image_id": sha, "question": f"what is in {pid}?", "source": "t",
                        "split": "train"})
        cands += [{"candidate_id": f"{pid}-{i}", "prompt_id": pid, "round_id": 1, "text": f"answer {i}",
                   "origin": "imported", "sample_index": i} for i in range(3)]
    labels = [{"prompt_id": "p1", "round_id": 1, "annotator": "ann", "chosen_id": "p1-2", "rejected_id": "p1-0"},
              # the latest label per annotator counts: ann changed her mind
              {"prompt_id": "p1", "round_id": 1, "annotator": "ann", "chosen_id": "p1-0", "rejected_id": "p1-2"}]
    prompts_db.write_import(cur, imgs, prompts, cands, labels)
    empty = {k: None for k in jstore.JUDGMENT_SCHEMA.names}
    rows = []
    for judge, f in (("a", lambda v: v), ("b", lambda v: 1 - v)):
        for cid, v in BASE.items():
            rows.append({**empty, "judgment_id": jstore.judgment_id(cid, judge, "v1"), "candidate_id": cid,
                         "judge": judge, "judge_version": "v1", "overall": f(v), "helpfulness": 4 * f(v),
                         "status": "ok"})
    rows.append({**empty, "judgment_id": jstore.judgment_id("p1-0", "c", "v1"), "candidate_id": "p1-0",
                 "judge": "c", "judge_version": "v1", "status": "invalid", "raw_output": "?"})
    jstore.write_judgments(cur, rows, [])
    return ws


def test_agreement_on_a_hand_made_database(tmp_path):
    ws = build_workspace(tmp_path)
    try:
        cur = ws.cursor()
        scores = agstore.judged_scores(cur, 1)
        assert len(scores) == 12                           # the invalid row of judge c is left out
        labels = agstore.latest_labels(cur)
        assert [(lab["chosen_id"], lab["rejected_id"]) for lab in labels] == [("p1-0", "p1-2")]
        report = agreement_report(scores, labels)
    finally:
        ws.close()
    assert report["judges"] == ["a:v1", "b:v1"] and report["rounds"] == [1]
    rank = {r["metric"]: r for r in report["rank"]}
    assert set(rank) == {"overall", "helpfulness"}
    assert rank["overall"]["spearman"] == pytest.approx(-1.0) and rank["helpfulness"]["kendall"] == pytest.approx(-1.0)
    human = {r["judge"]: r for r in report["human"]}
    assert human["a:v1"]["contradicts"] == 0 and human["b:v1"]["contradicts"] == 1

    out = run_cli("agreement", "-w", str(tmp_path / "ws"), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["rank"][0]["spearman"] == pytest.approx(-1.0)
    assert data["disagreement"][0]["question"].startswith("what is in")
    text = run_cli("agreement", "-w", str(tmp_path / "ws"), "--round", "1", "--top", "1")
    assert text.returncode == 0, text.stderr
    assert "spearman" in text.stdout and "-1.000" in text.stdout and "contradicts" in text.stdout
    assert "1 (100%)" in text.stdout


def test_agreement_on_an_empty_workspace(tmp_path):
    init_workspace(tmp_path / "ws").close()
    out = run_cli("agreement", "-w", str(tmp_path / "ws"))
    assert out.returncode == 0 and "no judgments yet" in out.stdout
