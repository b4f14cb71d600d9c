"""The Li/Lin/Pei baselines beside DPO (issue 14): ``train.method = sft`` (rejection sampling) and ``steerlm``
(attribute-conditioned SFT) on TRL's SFTTrainer, through the real train job, a tiny family, the owner's steps,
the loop and the rounds tab."""

from __future__ import annotations

import json
import shutil
import typing
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core import names, steerlm
from core.config import TrainConfig, WorkspaceConfig, update
from core.errors import ConfigError, UsageError
from tests import helpers as h
from tests.helpers import make_pairs, make_run, of, run_job

SUFFIX = "\n<attributes> helpfulness:4 correctness:4 coherence:4 complexity:1 verbosity:2"


def scored_rows(pairs: list[dict]) -> list[dict]:
    """steerlm's input (``scored.parquet``) from test pairs: both answers of each pair with judge values."""
    rows = []
    for i, p in enumerate(pairs):
        for side, values in (("chosen", (4, 4, 4, i % 3, 2)), ("rejected", (1, 2, 3, 1, 3))):
            rows.append({"prompt_id": p["prompt_id"], "candidate_id": p[f"{side}_id"], "image_path": p["image_path"],
                         "question": p["question"], "text": p[f"{side}_text"],
                         **dict(zip(steerlm.ATTRIBUTES, map(float, values)))})
    return rows


# ---- names, config, conditioning, example selection (in-process) ----------------------------------------

def test_method_names_agree_everywhere():
    from backend.jobs.configs import TRAIN_INPUT
    from backend.jobs.train import METHODS

    literal = list(typing.get_args(TrainConfig.model_fields["method"].annotation))
    assert literal == list(names.TRAIN_METHODS) == list(METHODS) == list(TRAIN_INPUT) == ["dpo", "sft", "steerlm"]
    assert TrainConfig().method == "dpo"
    with pytest.raises(ConfigError, match="train.method: Input should be 'dpo', 'sft' or 'steerlm'"):
        update(WorkspaceConfig(), {"train.method": "ppo"})
    with pytest.raises(ConfigError, match="unknown HelpSteer attribute 'style'; choose one of: helpfulness"):
        update(WorkspaceConfig(), {"train.steerlm_target": {"style": 2}})
    with pytest.raises(ConfigError, match="verbosity must be between 0 and 4"):
        update(WorkspaceConfig(), {"train.steerlm_target": {"verbosity": 5}})


def test_rejection_sampling_takes_each_prompts_best_answer():
    from backend.sft import rejection_sampling_examples

    def pair(prompt, chosen, rejected):
        return {"prompt_id": prompt, "chosen_id": chosen, "rejected_id": rejected, "image_path": "i.png",
                "question": f"q {prompt}", "chosen_text": f"text {chosen}", "rejected_text": f"text {rejected}"}

    pairs = [pair("p0", "a", "b"), pair("p0", "a", "c"),                       # seva: one chosen, two rejected
             pair("p1", "x", "y"), pair("p1", "x", "z"), pair("p1", "y", "z"),  # a ranking x > y > z, expanded
             pair("p2", "m", "n")]
    examples = rejection_sampling_examples(pairs)
    assert [(e["prompt_id"], e["candidate_id"], e["answer"]) for e in examples] == [
        ("p0", "a", "text a"), ("p1", "x", "text x"), ("p2", "m", "text m")]
    assert examples[1]["question"] == "q p1"  # no conditioning: (image, prompt, best response)


def test_steerlm_conditioning_string_is_in_the_training_rows(tiny_model_dir, tmp_path):
    from backend import sft
    from backend.models import load_processor

    values = dict(zip(steerlm.ATTRIBUTES, (4.0, 3.0, 4.0, 1.0, 2.5)))
    assert steerlm.attribute_string(values) == (
        "\n<attributes> helpfulness:4 correctness:3 coherence:4 complexity:1 verbosity:2.5")
    rows = scored_rows(make_pairs(tmp_path, 2))
    examples = sft.steerlm_examples(rows)
    dataset, stats = sft.build_dataset(examples, load_processor(str(tiny_model_dir)), TrainConfig(seed=0))
    assert stats.used == 4 and stats.skipped_total == 0
    by_answer = {r["completion"][0]["content"][0]["text"]: r["prompt"][0]["content"][1]["text"] for r in dataset}
    for row in rows:
        assert by_answer[row["text"]] == row["question"] + steerlm.attribute_string(row)
    # generation asks for the maximum where more is better, the data's median (or the config) elsewhere
    assert steerlm.generation_target(rows, {}) == {"helpfulness": 4, "correctness": 4, "coherence": 4,
                                                   "complexity": 1, "verbosity": 2}
    assert steerlm.generation_target(rows, {"verbosity": 1, "coherence": 3})["verbosity"] == 1
    assert steerlm.question_suffix({"method": "dpo"}) == "" and steerlm.question_suffix(None) == ""


def test_scored_candidates_query_and_the_owner_refuses_without_a_rubric_judge(tmp_path):
    from backend.steps.train import run_train
    from storage import judgments

    ws = h.build_workspace(tmp_path / "ws", pairs_judge=None)
    try:
        rows = judgments.scored_candidates(ws.cursor(), 1, "gemini", str(ws.root))
        # gemini rated p0..p3 on all five attributes; the critic's 0-100 scores and the unjudged p4 give none
        assert sorted({r["prompt_id"] for r in rows}) == ["p0", "p1", "p2", "p3"] and len(rows) == 12
        assert rows[0]["image_path"].startswith(str(ws.root)) and rows[0]["verbosity"] == 2
        assert judgments.scored_candidates(ws.cursor(), 1, "critic", str(ws.root)) == []
        with pytest.raises(UsageError, match="set pairs.judge to such a judge"):
            run_train(ws, overrides={"method": "steerlm"})
    finally:
        ws.close()


# ---- the real train job on tiny and a tiny family --------------------------------------------------------

@pytest.fixture(scope="module")
def steerlm_run(tmp_path_factory, tiny_model_dir):
    """One steerlm step on `tiny` through the train job: (checkpoint folder, its events, the run folder)."""
    root = tmp_path_factory.mktemp("steerlm")
    pairs = make_pairs(root, 3)
    run_dir = make_run(root, tiny_model_dir, pairs, max_steps=1, method="steerlm")
    (run_dir / "pairs.parquet").unlink()  # steerlm reads scored.parquet only
    pq.write_table(pa.Table.from_pylist(scored_rows(pairs)), run_dir / "scored.parquet")
    rc, events, stderr = run_job(run_dir)
    assert rc == 0, stderr[-3000:]
    return Path(of(events, "done")[0]["summary"]["output_dir"]), events, run_dir


def test_steerlm_trains_one_step_and_records_its_conditioning(steerlm_run, tiny_model_dir):
    out, events, run_dir = steerlm_run
    summary = of(events, "done")[0]["summary"]
    assert summary["method"] == "steerlm" and summary["steps"] == 1 and summary["pairs_used"] == 6
    assert not h.weight(out).equal(h.weight(tiny_model_dir)), "the language model did not change"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["method"] == "steerlm" and meta["parent_id"] == "c0" and meta["kind"] == "merged"
    assert meta["steerlm"]["suffix"] == SUFFIX  # complexities 0, 1, 2 and 1, 1, 1: median 1
    assert meta["config"]["method"] == "steerlm"
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()] == [1]
    assert any("LoRA SteerLM SFT" in e["message"] for e in of(events, "log"))


class AnswersEveryPrompt:
    """Stands in for the generate job's subprocess (the job passes questions through as given): one
    candidate per prompt of the run's prompts.parquet, the owner's request, which the test then reads."""

    def __init__(self, argv, run_dir, **kwargs):
        self.run_dir = Path(run_dir)

    def wait(self):
        from backend.job_runner import JobResult
        from backend.jobs.generate import SCHEMA, candidate_id

        config = json.loads((self.run_dir / "config.json").read_text())
        rows = [{"candidate_id": candidate_id(1, config["checkpoint_id"], r["prompt_id"], "original", 0),
                 "prompt_id": r["prompt_id"], "round_id": config["round_id"], "checkpoint_id": config["checkpoint_id"],
                 "text": "an answer", "origin": "policy", "view": "original", "sample_index": 0}
                for r in pq.read_table(self.run_dir / "prompts.parquet").to_pylist()]
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), self.run_dir / "candidates.parquet")
        return JobResult(0)


def test_generation_from_a_steerlm_checkpoint_asks_for_the_best_answers(steerlm_run, workspace, tmp_path,
                                                                          monkeypatch):
    from app.importer import import_path
    from backend.steps import generate
    from storage import rounds

    out = steerlm_run[0]
    shutil.copytree(out, workspace.lay.checkpoints / "r001")
    meta = json.loads((out / "meta.json").read_text())
    cur = workspace.cursor()
    rounds.add_checkpoint(cur, "c1", 1, "c0", "tiny", "checkpoints/r001", meta["kind"], meta)
    import_path(workspace, h.make_data(tmp_path), progress=False)
    stored = dict(cur.execute("SELECT prompt_id, question FROM prompts WHERE split = 'train'").fetchall())
    monkeypatch.setattr(generate, "Job", AnswersEveryPrompt)
    for checkpoint, suffix in (("c1", SUFFIX), ("c0", "")):  # the base model is asked plainly
        summary = generate.run_generate(workspace, checkpoint_id=checkpoint)
        asked = pq.read_table(workspace.lay.round_dir(1) / "generate" / "prompts.parquet").to_pylist()
        assert summary["candidates"] == len(asked) == len(stored) == 5
        assert all(r["question"] == stored[r["prompt_id"]] + suffix for r in asked)


def test_sft_trains_a_tiny_family(family_dirs, tmp_path):
    from backend import models

    folder = family_dirs["tiny-qwen2-vl"]
    run_dir = make_run(tmp_path, folder, make_pairs(tmp_path, 2), max_steps=1, method="sft",
                       base_model="tiny-qwen2-vl")
    rc, events, stderr = run_job(run_dir)
    assert rc == 0, stderr[-3000:]
    summary = of(events, "done")[0]["summary"]
    assert summary["method"] == "sft" and summary["steps"] == 1 and summary["pairs_used"] == 2
    before = dict(models.load_model(folder).named_parameters())
    after = dict(models.load_model(summary["output_dir"]).named_parameters())
    changed = [n for n, p in after.items() if not p.detach().equal(before[n].detach())]
    assert any("language_model" in n for n in changed), changed


@pytest.mark.parametrize("name", ["tiny", "tiny-idefics3"])
def test_projector_only_sft_leaves_the_rest_frozen(family_dirs, tiny_model_dir, tmp_path, name):
    """LLaVA's stage-1 alignment: `prefloop sft --projector-only` (train.full_modules = ["projector"])."""
    from backend import families, models
    from backend.dpo import model_part

    folder = tiny_model_dir if name == "tiny" else family_dirs[name]
    run_dir = make_run(tmp_path, folder, make_pairs(tmp_path, 2), max_steps=1, method="sft", lora=False,
                       full_modules=["projector"], base_model=name)
    rc, events, stderr = run_job(run_dir)
    assert rc == 0, stderr[-3000:]
    assert any("full fine-tuning of projector" in e.get("message", "") for e in of(events, "log"))
    out = of(events, "done")[0]["summary"]["output_dir"]
    family = families.family_of(folder)
    before = dict(models.load_model(folder).named_parameters())
    after = dict(models.load_model(out).named_parameters())
    changed = {model_part(family, n) for n, p in after.items() if not p.detach().equal(before[n].detach())}
    assert changed == {"projector"}, changed


# ---- through the loop and the rounds tab -----------------------------------------------------------------

def test_an_sft_round_through_the_loop_shows_its_method(tmp_path, tiny_model_dir):
    from app.server import AppContext, rounds_tab
    from backend.loop import start_round
    from storage import rounds
    from storage import users as users_db

    rows = []
    for i in range(3):  # answers and a preference imported: the round stands at its review
        h.make_image(tmp_path / "data" / f"img{i}.png", color=(60 * i, 90, 200))
        rows.append({"image": f"img{i}.png", "question": f"What is shape {i}?", "chosen": f"A red square {i}.",
                     "rejected": "A blue circle."})
    ws = h.review_workspace(tmp_path, tiny_model_dir, rows, {
        **h.ROUND_CONFIG, "train.method": "sft", "pairs.strategy": "human-only", "round.eval_judge": None,
        "generation.k": 1, "generation.views": ["original"]})
    try:
        assert start_round(ws, 1).run()["trained"] == 1  # pairs, train, promote; then round 2 is generated
        meta = json.loads((ws.lay.checkpoints / "r001" / "meta.json").read_text())
        assert meta["method"] == "sft" and meta["parent_id"] == "c0" and meta["pairs_used"] == 3  # one per prompt
        cur = ws.cursor()
        assert [m["step"] for m in rounds.train_metrics(cur, 1)] == [1, 2]  # 3 examples, 2 per step
        assert rounds.get_checkpoint(cur, "c1")["parent_id"] == "c0"
        assert rounds.training_method(cur, 1) == "sft"
        users_db.add_user(cur, "boss", "admin", "boss-password")
        ctx = AppContext(ws)
        d = rounds_tab.details(ctx, "boss", 1)
        assert d["method"] == "sft" and "**sft**: rejection sampling" in d["method_text"]
        assert rounds_tab.details(ctx, "boss", 2)["method"] == "sft"  # not trained yet: its saved config says so
    finally:
        ws.close()


def test_a_steerlm_round_needs_no_pairs(tmp_path, tiny_model_dir):
    """The loop's pairs step stops a round with no usable pairs, except for steerlm (scored candidates)."""
    from backend.loop import start_round
    from storage import rounds

    rows = []
    for i in range(2):  # imported answers, no preference: human-only makes 0 pairs
        h.make_image(tmp_path / "data" / f"img{i}.png", color=(60 * i, 90, 200))
        rows.append({"image": f"img{i}.png", "question": f"What is shape {i}?",
                     "candidates": [f"A red square {i}.", "A blue circle."]})
    ws = h.review_workspace(tmp_path, tiny_model_dir, rows, {
        **h.ROUND_CONFIG, "train.method": "steerlm", "pairs.strategy": "human-only", "pairs.judge": "gemini",
        "round.eval_judge": None, "generation.k": 1, "generation.views": ["original"]})
    try:
        cur = ws.cursor()
        for n, (cid,) in enumerate(cur.execute("SELECT candidate_id FROM candidates ORDER BY 1").fetchall()):
            h.add_judgment(cur, cid, "gemini", 3.0, helpfulness=4 - n % 2, correctness=3, coherence=4,
                           complexity=1, verbosity=2)
        assert start_round(ws, 1).run()["trained"] == 1
        meta = json.loads((ws.lay.checkpoints / "r001" / "meta.json").read_text())
        assert meta["method"] == "steerlm" and meta["pairs_used"] == 4
        assert rounds.get_checkpoint(ws.cursor(), "c1")["parent_id"] == "c0"
    finally:
        ws.close()
