"""Judges: the registry and CLI, critic prompts and aggregation, the critic end to end on tiny, the
reference judge on easy-vqa, judgment storage and `prefloop judge`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from annotators import rubric
from annotators.base import CandidateText, JudgeItem
from annotators.critic import (
    MODES,
    CriticReply,
    aggregate,
    build_requests,
    judge_version,
    load_template,
    ordered_pairs,
    pairwise_tally,
)
from annotators.reference import ReferenceJudge, normalize, score_answer
from annotators.registry import JUDGES, make_judge
from core import config as cfgmod
from core.errors import UsageError
from storage import judgments as jstore
from storage import prompts as prompts_db
from storage import rounds
from storage.workspace import init_workspace
from tests.helpers import make_image, run_cli

easy_vqa = pytest.importorskip("easy_vqa")


def item(k: int = 3, prompt_id: str = "p1", reference: str | None = None, image_path: str = "/x.png") -> JudgeItem:
    return JudgeItem(prompt_id, "What shape is it?", image_path, "img",
                     tuple(CandidateText(f"c{i}", f"answer number {i}") for i in range(k)), reference)


def replies_for(it: JudgeItem, mode: str, reply) -> list[CriticReply]:
    """A fake critic: ``reply(request) -> text`` for every request of the item."""
    return [CriticReply(r.request_id, reply(r), num_tokens=5, latency_ms=10.0) for r in build_requests([it], mode)]


# ---------------------------------------------------------------------------------------------- registry

def test_registry_names_every_judge_and_the_cli_offers_them():
    assert set(JUDGES) == {"gemini", "critic", "reference"}
    with pytest.raises(UsageError, match="choose one of: gemini, critic, reference"):
        make_judge("gpt", cfgmod.WorkspaceConfig(), Path("."))
    from app.commands import judge as judge_cmd

    p = argparse.ArgumentParser()
    judge_cmd.add_arguments(p)
    help_text = p.format_help()
    for name in JUDGES:
        assert name in help_text
    for mode in MODES:
        assert mode in help_text


def test_registry_builds_critic_and_reference_with_versions(tmp_path):
    cfg = cfgmod.update(cfgmod.WorkspaceConfig(), {"judges.critic.mode": "pairwise"})
    critic = make_judge("critic", cfg, tmp_path)
    assert (critic.name, critic.version, critic.traits.per_candidate) == ("critic", "pairwise-v2", False)
    assert make_judge("critic", cfgmod.WorkspaceConfig(), tmp_path).version == "pointwise-v2"
    assert judge_version("rubric") == f"rubric-v1+{rubric.TEMPLATE_VERSION}"
    ref = make_judge("reference", cfg, tmp_path)
    assert (ref.name, ref.version) == ("reference", "v1")


def test_critic_templates_render_question_answers_and_the_helpsteer_guide():
    it = item(3)
    for mode in MODES:
        assert load_template(mode).strip()
    point = build_requests([it], "pointwise")
    assert [r.candidate_id for r in point] == ["c0", "c1", "c2"]
    assert "What shape is it?" in point[1].text and "answer number 1" in point[1].text
    assert "out of 100" in point[0].text
    pair = build_requests([it], "pairwise")
    assert [(r.first_id, r.second_id) for r in pair] == ordered_pairs(["c0", "c1", "c2"])
    assert len(pair) == 3 * 2 and len({r.request_id for r in pair}) == 6
    first, second = pair[0].text.index("answer number 0"), pair[0].text.index("answer number 1")
    assert first < second
    rub = build_requests([it], "rubric")[0].text
    for m in rubric.RUBRIC.values():
        assert m.definition in rub and m.levels[4] in rub


# The lmms-lab/llava-critic-7b model card's quick start, its two critic_prompt strings as printed there
# (pairwise, and the commented-out pointwise one), with the card's example question and responses.
CARD_QUESTION = "What this image presents?"
CARD_FIRST = ("The image is a black and white sketch of a line that appears to be in the shape of a cross. "
              "The line is a simple and straightforward representation of the cross shape, with two "
              "straight lines intersecting at a point.")
CARD_SECOND = "This is a handwritten number seven."
CARD_PAIRWISE = ("Given an image and a corresponding question, please serve as an unbiased and fair judge to "
                 "evaluate the quality of the answers provided by a Large Multimodal Model (LMM). Determine "
                 "which answer is better and explain your reasoning with specific details. Your task is "
                 f"provided as follows:\nQuestion: [{CARD_QUESTION}]\nThe first response: [{CARD_FIRST}]"
                 f"\nThe second response: [{CARD_SECOND}]\nASSISTANT:\n")
CARD_POINTWISE = ("Given an image and a corresponding question, please serve as an unbiased and fair judge "
                  "to evaluate the quality of answer answers provided by a Large Multimodal Model (LMM). "
                  "Score the response out of 100 and explain your reasoning with specific details. Your task "
                  f"is provided as follows:\nQuestion: [{CARD_QUESTION}]\nThe LMM response: [{CARD_SECOND}]"
                  "\nASSISTANT:\n ")


def test_pointwise_and_pairwise_prompts_are_llava_critics_trained_format():
    answers = (CandidateText("a", CARD_FIRST), CandidateText("b", CARD_SECOND))
    it = JudgeItem("p1", CARD_QUESTION, "/x.png", "img", answers)
    pair = build_requests([it], "pairwise")[0]
    assert (pair.first_id, pair.second_id) == ("a", "b")
    assert pair.text == CARD_PAIRWISE                      # word for word, ending with the ASSISTANT: line
    point = build_requests([it], "pointwise")[1]
    # the card's doubled word ("answer answers") and the space after its last newline are not copied
    assert point.text == CARD_POINTWISE.replace("of answer answers", "of the answer").removesuffix(" ")
    assert point.text.endswith("]\nASSISTANT:\n")
    # the prompt is the user turn's text, after the image: the engine's chat template opens the assistant
    # turn, as the card's qwen_1_5 conversation does
    from backend.engines.base import GenRequest, build_messages

    msgs = build_messages(GenRequest(question=pair.text, image=object()))
    assert [m["role"] for m in msgs] == ["user"]
    assert msgs[0]["content"] == [{"type": "image"}, {"type": "text", "text": CARD_PAIRWISE}]


# ---------------------------------------------------------------------------------------------- aggregation

def test_pairwise_tally_is_wins_minus_losses():
    ids = ["a", "b", "c"]
    verdicts = [("a", "b", "first"), ("b", "a", "second"),   # a beats b twice
                ("a", "c", "second"), ("c", "a", "tie"),     # c beats a once, one tie
                ("b", "c", "first"), ("c", "b", None)]       # b beats c once, one invalid
    t = pairwise_tally(ids, verdicts)
    # a_ij = number of comparisons in which i beat j
    a = {("a", "b"): 2, ("c", "a"): 1, ("b", "c"): 1}
    for i in ids:
        r_i = sum(a.get((i, k), 0) for k in ids) - sum(a.get((l, i), 0) for l in ids)
        assert t[i].r == r_i
    assert (t["a"].r, t["b"].r, t["c"].r) == (1, -1, 0)
    assert (t["a"].wins, t["a"].losses, t["a"].ties, t["a"].valid) == (2, 1, 1, 4)
    assert t["c"].valid == 3 and t["a"].overall == pytest.approx((1 + 4) / 8)


def test_position_bias_cancels_for_a_critic_that_always_says_first():
    it = item(4)
    [v] = aggregate([it], "pairwise", replies_for(it, "pairwise", lambda r: "Response 1 is better."))
    assert len(v.pairwise) == 4 * 3 and all(p.winner == "first" and p.status == "ok" for p in v.pairwise)
    assert [s.score for s in v.scores] == [0.0] * 4
    assert [s.overall for s in v.scores] == [0.5] * 4
    assert v.status == "ok" and all(s.status == "ok" for s in v.scores)


def test_pairwise_consistent_critic_ranks_the_candidates():
    it = item(3)
    rank = {"c0": 3, "c1": 2, "c2": 1}   # the critic prefers c0 > c1 > c2 in either position

    def reply(r):
        return "[[A]]" if rank[r.first_id] > rank[r.second_id] else "[[B]]"

    [v] = aggregate([it], "pairwise", replies_for(it, "pairwise", reply))
    assert [s.score for s in v.scores] == [4.0, 0.0, -4.0]          # 2(K-1) wins ... 2(K-1) losses
    assert [s.overall for s in v.scores] == [1.0, 0.5, 0.0]
    assert v.tokens_out == 6 * 5 and v.latency_ms == pytest.approx(60.0)


def test_pairwise_garbage_and_missing_replies():
    it = item(2)
    reqs = replies_for(it, "pairwise", lambda r: "lorem ipsum")
    [v] = aggregate([it], "pairwise", reqs[:1])                     # second reply lost
    assert [p.status for p in v.pairwise] == ["invalid", "error"]
    assert v.pairwise[0].raw_output == "lorem ipsum"
    assert all(s.status == "invalid" and s.score is None for s in v.scores) and v.status == "invalid"
    [single] = aggregate([item(1)], "pairwise", [])
    assert single.scores[0].status == "invalid" and "two candidates" in single.scores[0].reasoning


def test_pointwise_aggregation_scores_invalid_and_missing():
    it = item(3)
    texts = {"c0": "Accurate. Score: 80", "c1": "no idea what to say"}
    got = [r for r in replies_for(it, "pointwise", lambda r: texts.get(r.candidate_id, "")) if "c2" not in r.request_id]
    [v] = aggregate([it], "pointwise", got)
    s0, s1, s2 = v.scores
    assert (s0.status, s0.score, s0.overall) == ("ok", 80.0, 0.8)
    assert (s1.status, s1.score, s1.overall, s1.reasoning) == ("invalid", None, None, "no idea what to say")
    assert s2.status == "error"
    assert "no idea what to say" in v.raw_output and "Score: 80" in v.raw_output and v.status == "ok"


def test_rubric_aggregation_full_partial_and_none():
    it = item(3)
    texts = {"c0": "Helpfulness: 4\nCorrectness: 4\nCoherence: 2\nComplexity: 1\nVerbosity: 2",
             "c1": "Helpfulness: 3\nVerbosity: 1", "c2": "I cannot rate this."}
    [v] = aggregate([it], "rubric", replies_for(it, "rubric", lambda r: texts[r.candidate_id]))
    full, partial, none = v.scores
    assert full.status == "ok" and full.overall == pytest.approx(10 / 12) and full.complexity == 1.0
    assert partial.status == "ok" and partial.helpfulness == 3.0 and partial.correctness is None
    assert partial.overall is None
    assert none.status == "invalid" and none.helpfulness is None


# ---------------------------------------------------------------------------------------------- reference

def easy_vqa_examples(n: int = 40) -> list[tuple[str, str, str]]:
    questions, answers, image_ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    return [(q, a, paths[i]) for q, a, i in list(zip(questions, answers, image_ids))[:n]]


def test_reference_scores_easy_vqa_answers():
    examples = easy_vqa_examples()
    shape = next((q, a) for q, a, _ in examples if a in {"circle", "rectangle", "triangle"})
    yes = next((q, a) for q, a, _ in examples if a == "yes")
    no = next((q, a) for q, a, _ in examples if a == "no")
    colour = next((q, a) for q, a, _ in examples if a not in {"circle", "rectangle", "triangle", "yes", "no"})
    ref = shape[1]
    other = next(s for s in ("circle", "rectangle", "triangle") if s != ref)
    assert score_answer(ref.capitalize() + ".", ref)[0] == 4
    assert score_answer(f"The shape is a {ref}.", ref)[0] == 3
    assert score_answer(f"It is a {other}.", ref)[0] == 0
    assert score_answer(f"{ref}s", ref)[0] == 0                       # whole words only
    assert score_answer("Yes.", yes[1])[0] == 4
    assert score_answer("Yes, there is one in the image.", yes[1])[0] == 3
    assert score_answer("No, there is not.", yes[1])[0] == 0
    assert score_answer("No, there is no such shape.", no[1])[0] == 3
    assert score_answer("Yes and no.", no[1])[0] == 0                  # contradicts itself
    assert score_answer(f"The colour is {colour[1].upper()}!", colour[1])[0] == 3
    assert score_answer("two", "2")[0] == 4 and score_answer("There are 2 shapes.", "two")[0] == 3
    assert normalize("The  Circle!") == "circle"


def test_reference_judge_verdicts_and_items_without_reference():
    judge = ReferenceJudge()
    with_ref = JudgeItem("p1", "what shape?", "/x.png", "img",
                         (CandidateText("a", "circle"), CandidateText("b", "A red circle."),
                          CandidateText("c", "square")), reference="circle")
    no_ref = JudgeItem("p2", "describe", "/x.png", "img", (CandidateText("d", "text"),))
    v1, v2 = judge.judge([with_ref, no_ref])
    assert [(s.score, s.overall, s.status) for s in v1.scores] == [(4, 1.0, "ok"), (3, 0.75, "ok"), (0, 0.0, "ok")]
    assert v2.scores == [] and v2.prompt_id == "p2"


# ---------------------------------------------------------------------------------------------- storage

def add_prompts(ws, tmp_path: Path, specs: list[tuple[str, str | None, list[str]]]) -> None:
    """Prompts (id, reference, candidate texts) with one image each, as round-1 imported candidates."""
    from storage import images as images_db

    imgs, prompts, cands = [], [], []
    for n, (pid, reference, texts) in enumerate(specs):
        p = make_image(tmp_path / "imgs" / f"{pid}.png", color=(30 * n % 255, 120, 200))
        data = p.read_bytes()
        sha = images_db.sha256_hex(data)
        rel = images_db.store_relpath(sha, "PNG")
        images_db.write_atomic(ws.root / rel, data)
        imgs.append({"image_id": sha, "path": rel, "width": 48, "height": 40, "format": "PNG", "n_bytes": len(data)})
        prompts.append({"prompt_id": pid, "image_id": sha, "question": f"question {pid}?", "source": "test",
                        "split": "train", "reference": reference})
        cands += [{"candidate_id": f"{pid}-{i}", "prompt_id": pid, "round_id": 1, "text": t, "origin": "imported",
                   "sample_index": i} for i, t in enumerate(texts)]
    prompts_db.write_import(ws.cursor(), imgs, prompts, cands, [])


def test_candidates_to_judge_and_retry_invalid(workspace, tmp_path):
    add_prompts(workspace, tmp_path, [("p1", "x", ["a", "b"]), ("p2", None, ["c"])])
    cur = workspace.cursor()
    todo = jstore.candidates_to_judge(cur, 1, "critic", "pointwise-v1", str(workspace.root))
    assert [(p["prompt_id"], [c["candidate_id"] for c in p["candidates"]]) for p in todo] == [
        ("p1", ["p1-0", "p1-1"]), ("p2", ["p2-0"])]
    assert Path(todo[0]["image_path"]).is_file() and todo[0]["reference"] == "x"
    row = {k: None for k in jstore.JUDGMENT_SCHEMA.names}
    jstore.write_judgments(cur, [
        {**row, "judgment_id": jstore.judgment_id("p1-0", "critic", "pointwise-v1"), "candidate_id": "p1-0",
         "judge": "critic", "judge_version": "pointwise-v1", "status": "invalid", "raw_output": "???"},
        {**row, "judgment_id": jstore.judgment_id("p2-0", "critic", "pointwise-v1"), "candidate_id": "p2-0",
         "judge": "critic", "judge_version": "pointwise-v1", "status": "ok", "score": 50.0, "overall": 0.5},
    ], [])
    todo = jstore.candidates_to_judge(cur, 1, "critic", "pointwise-v1", str(workspace.root))
    assert [(p["prompt_id"], [c["candidate_id"] for c in p["candidates"]]) for p in todo] == [("p1", ["p1-1"])]
    whole = jstore.candidates_to_judge(cur, 1, "critic", "pointwise-v1", str(workspace.root), whole_prompt=True)
    assert [c["candidate_id"] for c in whole[0]["candidates"]] == ["p1-0", "p1-1"]
    retry = jstore.candidates_to_judge(cur, 1, "critic", "pointwise-v1", str(workspace.root), retry_invalid=True)
    assert [c["candidate_id"] for c in retry[0]["candidates"]] == ["p1-0", "p1-1"] and len(retry) == 1
    other_version = jstore.candidates_to_judge(cur, 1, "critic", "pairwise-v1", str(workspace.root), limit=1)
    assert [p["prompt_id"] for p in other_version] == ["p1"]
    # writing the same judgment again replaces it (deterministic id)
    jstore.write_judgments(cur, [{**row, "judgment_id": jstore.judgment_id("p1-0", "critic", "pointwise-v1"),
                                  "candidate_id": "p1-0", "judge": "critic", "judge_version": "pointwise-v1",
                                  "status": "ok", "score": 70.0, "overall": 0.7}], [])
    rows = jstore.list_judgments(cur, judge="critic")
    assert len(rows) == 2 and {r["candidate_id"]: r["status"] for r in rows} == {"p1-0": "ok", "p2-0": "ok"}


def test_critic_end_to_end_on_tiny(workspace, tmp_path):
    """The critic job on tiny: noise replies become invalid rows with raw output kept; the batch completes."""
    from backend.jobs.critic import OUTPUT
    from backend.steps.judge import run_judge

    add_prompts(workspace, tmp_path, [("p1", None, ["A red circle.", "A square.", "circle"]),
                                      ("p2", None, ["Two shapes.", "yes"])])
    workspace.save_config(cfgmod.update(workspace.config, {"judges.critic.max_new_tokens": 12}))
    events: list[dict] = []
    s = run_judge(workspace, "critic", mode="pairwise", on_event=events.append)
    assert (s["prompts"], s["candidates"], s["pairwise_verdicts"]) == (2, 5, 3 * 2 + 2 * 1)
    assert s["invalid"] >= 1 and s["ok"] + s["invalid"] == 5 and s["error"] == 0
    assert events[-1]["event"] in ("progress", "done", "log") and any(e.get("event") == "progress" for e in events)
    cur = workspace.cursor()
    verdicts = jstore.list_pairwise_verdicts(cur, "critic", judge_version("pairwise"))
    assert len(verdicts) == 8 and all(v["raw_output"] for v in verdicts)
    run_dir = workspace.root / "runs" / "r001" / "judge-critic-pairwise"
    assert (run_dir / OUTPUT).is_file() and (run_dir / "config.json").is_file()
    assert (workspace.root / "checkpoints" / "critic-tiny" / "config.json").is_file()
    assert rounds.get_step(cur, 1, "judge-critic-pairwise")["status"] == "done"

    s = run_judge(workspace, "critic", mode="pointwise", limit=1)
    assert (s["prompts"], s["candidates"]) == (1, 3)
    rows = jstore.list_judgments(cur, judge="critic", judge_version=judge_version("pointwise"))
    assert len(rows) == 3
    for r in rows:
        assert r["status"] in ("ok", "invalid") and r["raw_output"] and r["reasoning"]
        assert r["reasoning"] in r["raw_output"] and r["tokens_out"] is not None
        if r["status"] == "invalid":
            assert r["score"] is None and r["overall"] is None
    assert any(r["status"] == "invalid" for r in rows)
    left = jstore.candidates_to_judge(cur, 1, "critic", judge_version("pointwise"), str(workspace.root))
    assert [p["prompt_id"] for p in left] == ["p2"]                    # only p2 is left for the next run
    assert run_judge(workspace, "critic", mode="pairwise")["candidates"] == 0   # nothing new: no job


def easy_vqa_jsonl(tmp_path: Path) -> Path:
    """Four easy-vqa prompts with their references and hand-written candidates, plus one without a reference."""
    examples = easy_vqa_examples(200)
    seen, rows = set(), []
    for q, a, path in examples:
        if a in seen:
            continue
        seen.add(a)
        rows.append({"image": path, "question": q, "reference": a,
                     "candidates": [a, f"I think the answer is {a}.", "I am not sure."]})
        if len(rows) == 4:
            break
    rows.append({"image": examples[0][2], "question": "Describe the image in detail.",
                 "candidates": ["A shape on a white background."]})
    f = tmp_path / "vqa.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def test_prefloop_judge_reference_cli(tmp_path):
    from app.importer import import_path

    ws = init_workspace(tmp_path / "ws")
    try:
        rounds.ensure_first_round(ws.cursor(), base_model="tiny")
        res = import_path(ws, easy_vqa_jsonl(tmp_path), allow_outside=True, progress=False)
        assert res.new_prompts == 5 and res.candidates == 13
    finally:
        ws.close()
    out = run_cli("judge", "-w", str(tmp_path / "ws"), "--judge", "reference", "--quiet")
    assert out.returncode == 0, out.stderr
    assert "judged 12 candidates of 4 prompts: 12 ok" in out.stdout and "1 prompt(s) skipped" in out.stdout
    again = run_cli("judge", "-w", str(tmp_path / "ws"), "--judge", "reference", "--quiet")
    assert again.returncode == 0, again.stderr
    assert "nothing to judge" in again.stdout
    bad = run_cli("judge", "-w", str(tmp_path / "ws"), "--judge", "reference", "--mode", "pairwise")
    assert bad.returncode == 2 and "--mode applies to the critic judge only" in bad.stderr

    from storage.workspace import open_workspace

    with open_workspace(tmp_path / "ws") as ws:
        rows = jstore.list_judgments(ws.cursor(), judge="reference")
        assert len(rows) == 12 and {r["judge_version"] for r in rows} == {"v1"}
        assert sorted(r["score"] for r in rows) == [0.0] * 4 + [3.0] * 4 + [4.0] * 4
        assert all(r["overall"] == r["score"] / 4 for r in rows)
        from storage import audit

        assert audit.recent(ws.cursor(), action="judge")[0]["actor"].startswith("cli")
