"""The whole loop on every real model family (issue 13), on their tiny random-weight builds.

Per family, through the CLI and the round state machine: import -> generate (hf, k candidates, the default
SeVa views) -> critic judge (the family model is its own critic: its noise is stored as invalid rows) ->
pairs -> LoRA train -> merge -> eval -> round 2 generated from round 1's merged checkpoint; then the pair
export loaded with `datasets` and trained one step by a plain `trl.DPOTrainer`. Besides, per family: a full
fine-tune train job and a 2-rank DeepSpeed ZeRO-3 LoRA train job (tiny-qwen2-vl's full fine-tune is the one
under ZeRO-3). Every job here costs its process start (~5 s of imports): k, prompts, tokens and steps are
minimal and each family's loop is one module-scoped workspace.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from app.cli import main as cli_main
from backend import families
from backend.tiny_families import BUILDERS
from core.config import GenerationConfig
from tests.helpers import free_port, make_pairs, make_run, make_ws, of, q, run_job, run_launcher

NAMES = list(BUILDERS)
PROMPTS, K = 3, 2
VIEWS = GenerationConfig().views
"""The default views: the original image and one SeVa (diffusion noise) view."""
PER_ROUND = PROMPTS * K + PROMPTS
"""Candidates per round: k per prompt on the original view, one per prompt on the SeVa view."""


def loop_config(critic: Path) -> dict:
    """A small round: k = 2 answers of at most 6 tokens, the family model as the critic (judges.default), the
    reference judge for the eval (in the owner: no third model job), one LoRA step (at most 3 pairs in one
    batch of 4)."""
    return {"generation.k": K, "generation.max_new_tokens": 6, "generation.views": VIEWS,
            "judges.default": ["critic"], "judges.critic.model": str(critic), "judges.critic.max_new_tokens": 6,
            "round.eval_judge": "reference", "train.batch_size": 4, "train.lora_r": 4, "train.lora_alpha": 8}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """3 train prompts and 1 held-out prompt (with a reference) on 64x64 crops of a real photo."""
    from app.demo_content import image

    root = tmp_path_factory.mktemp("family-data")
    photo = image("coffee").convert("RGB")
    rows = []
    for i in range(PROMPTS):
        photo.crop((64 * i, 64 * i, 64 * i + 64, 64 * i + 64)).save(root / f"crop{i}.png")
        rows.append({"image": f"crop{i}.png", "question": f"What is in corner {i}?"})
    rows.append({"image": "crop0.png", "question": "Is this a cup?", "split": "heldout", "reference": "yes"})
    (root / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root / "q.jsonl"


@pytest.fixture(scope="module", params=NAMES)
def looped(request, tmp_path_factory, family_dirs, data) -> tuple[str, Path]:
    """One family's workspace after `prefloop round start --rounds 1`: round 1 trained, evaluated and
    promoted, round 2 generated and judged from round 1's checkpoint (stopped at its review)."""
    name = request.param
    folder = family_dirs[name]
    ws = make_ws(tmp_path_factory.mktemp(name), folder, model=name, data=data, **loop_config(folder))
    assert cli_main(["round", "start", "-w", str(ws), "--rounds", "1", "--quiet"]) == 0
    return name, ws


@pytest.mark.slow
def test_round_one_runs_every_step(looped):
    name, ws = looped
    assert q(ws, "SELECT round_id, status, policy_checkpoint_id FROM rounds ORDER BY 1") == [
        (1, "done", "c0"), (2, "collecting", "c1")]
    views = q(ws, "SELECT origin, view, count(*) FROM candidates WHERE round_id = 1 AND origin <> 'eval' "
                  "GROUP BY ALL ORDER BY 1")
    assert VIEWS == ["original", "aug:diffusion:500"]
    # k sampled answers on the original image, one greedy answer on the noised one (SeVa)
    assert views == [("policy", "original", PROMPTS * K), ("seva_augmented", "aug:diffusion:500", PROMPTS)]
    # the critic (the family model itself) judged every candidate: its noise is kept as invalid rows
    judged = q(ws, """SELECT count(*), count(DISTINCT j.candidate_id), count(*) FILTER (WHERE j.raw_output IS NOT NULL)
                      FROM judgments j JOIN candidates c USING (candidate_id)
                      WHERE c.round_id = 1 AND c.origin <> 'eval' AND j.judge = 'critic'""")
    assert judged == [(PER_ROUND, PER_ROUND, PER_ROUND)]
    assert {s for (s,) in q(ws, "SELECT DISTINCT status FROM judgments WHERE judge = 'critic'")} <= {"ok", "invalid"}
    assert q(ws, "SELECT status, error FROM round_steps WHERE round_id = 1 AND step = 'judge-critic-pointwise'") == [
        ("done", None)]
    pairs = q(ws, "SELECT source, count(*) FROM pairs WHERE round_id = 1 GROUP BY 1")
    assert pairs and pairs[0][0] == "seva" and pairs[0][1] >= 1
    (kind, parent, meta), = q(ws, "SELECT kind, parent_id, meta FROM checkpoints WHERE checkpoint_id = 'c1'")
    assert (kind, parent) == ("merged", "c0")
    meta = json.loads(meta)
    assert meta["config"]["lora"] is True and meta["steps"] == 1 and meta["base_model"] == name
    merged = ws / "checkpoints" / "r001"
    assert (merged / "adapter" / "adapter_config.json").is_file() and (merged / "config.json").is_file()
    assert families.family_of(merged) == families.family_of(ws / "checkpoints" / "c0")
    assert q(ws, "SELECT count(*) FROM train_metrics WHERE round_id = 1")[0][0] == 1
    # eval: c1 and c0 answered the held-out prompt, the reference judge compared them
    assert q(ws, "SELECT DISTINCT checkpoint_id FROM candidates WHERE origin = 'eval' ORDER BY 1") == [
        ("c0",), ("c1",)]
    assert q(ws, "SELECT baseline_checkpoint_id, checkpoint_id, judge, wins + losses + ties, n FROM evals") == [
        ("c0", "c1", "reference", 1, 1)]


@pytest.mark.slow
def test_round_two_is_generated_from_round_one(looped):
    name, ws = looped
    assert q(ws, "SELECT checkpoint_id, parent_id FROM checkpoints ORDER BY 1") == [("c0", None), ("c1", "c0")]
    assert q(ws, "SELECT policy_checkpoint_id FROM rounds WHERE round_id = 2") == [("c1",)]
    assert q(ws, "SELECT path, base_model FROM checkpoints WHERE checkpoint_id = 'c1'") == [("checkpoints/r001", name)]
    assert q(ws, "SELECT DISTINCT checkpoint_id FROM candidates WHERE round_id = 2") == [("c1",)]
    assert q(ws, "SELECT count(*) FROM candidates WHERE round_id = 2")[0][0] == PER_ROUND
    config = json.loads((ws / "runs" / "r002" / "generate" / "config.json").read_text())
    assert Path(config["model_path"]).resolve() == (ws / "checkpoints" / "r001").resolve()
    assert q(ws, """SELECT count(*) FROM judgments j JOIN candidates c USING (candidate_id)
                    WHERE c.round_id = 2 AND j.judge = 'critic'""")[0][0] == PER_ROUND


@pytest.mark.slow
def test_exported_pairs_train_one_trl_step(looped, family_dirs, tmp_path):
    """`prefloop export --pairs` -> datasets -> one plain trl.DPOTrainer LoRA step with the family's processor."""
    import datasets
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from backend.models import load_model, load_processor

    name, ws = looped
    out = tmp_path / "pairs.parquet"
    assert cli_main(["export", "-w", str(ws), "--pairs", "--round", "1", "--out", str(out)]) == 0
    ds = datasets.load_dataset("parquet", data_files=str(out), split="train")
    assert len(ds) == q(ws, "SELECT count(*) FROM pairs WHERE round_id = 1")[0][0]
    assert ds[0]["images"][0].size == (64, 64)

    merged = ws / "checkpoints" / "r001"  # round 1's merged checkpoint
    family = families.family_of(merged)
    assert family == families.family_of(family_dirs[name])
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=len(ds), max_steps=1,
                     report_to=[], gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
                     save_strategy="no", logging_steps=1, disable_tqdm=True)
    processor = load_processor(merged)
    assert type(processor).__name__ == family.processor_class
    trainer = DPOTrainer(model=load_model(merged), args=args, train_dataset=ds, processing_class=processor,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=family.lora_target))
    assert trainer.train().global_step == 1
    logged = trainer.state.log_history[0]
    assert math.isfinite(logged["loss"]) and math.isfinite(logged["logps/chosen"]) and logged["logps/chosen"] < 0


def _moved(before: Path, after: Path) -> dict[str, tuple[int, int]]:
    """Per part of the model (the language model's LoRA-able layers, the projector, the vision tower):
    (weights, weights that differ) between the models saved in ``before`` and ``after``."""
    from backend.models import load_model

    family = families.family_of(before)
    parts = {"language_model": lambda n: re.fullmatch(family.lora_target, n.rsplit(".", 1)[0]),
             "projector": lambda n: any(f".{p}." in n for p in family.projector),
             "vision_tower": lambda n: re.search(family.vision_tower, n)
             and not any(f".{p}." in n for p in family.projector)}
    a, b = (dict(load_model(folder).named_parameters()) for folder in (before, after))
    assert a.keys() == b.keys()
    return {part: (sum(1 for n in a if hit(n)), sum(1 for n in a if hit(n) and not a[n].equal(b[n])))
            for part, hit in parts.items()}


def _trained(moved: dict, *, vision: bool) -> None:
    """The language model and the projector moved; the vision tower moved only if ``vision`` (full FT)."""
    for part in ("language_model", "projector", "vision_tower"):
        assert moved[part][0] > 0, f"no {part} weights found"
    assert moved["language_model"][1] > 0 and moved["projector"][1] > 0, moved
    assert (moved["vision_tower"][1] > 0) == vision, moved


FULL_LOCAL = [n for n in NAMES if n != "tiny-qwen2-vl"]
"""tiny-qwen2-vl's full fine-tune runs under ZeRO-3 (test_zero3_full_finetune_on_two_cpu_ranks)."""


@pytest.mark.parametrize("name", FULL_LOCAL)
def test_full_finetune_train_job(family_dirs, tmp_path, name):
    """train.lora = false through our train job: the whole model trains and the result loads as the family."""
    folder = family_dirs[name]
    run_dir = make_run(tmp_path, folder, make_pairs(tmp_path, 2), max_steps=1, base_model=name, lora=False)
    rc, events, stderr = run_job(run_dir)
    assert rc == 0, stderr[-3000:]
    summary = of(events, "done")[0]["summary"]
    assert (summary["steps"], summary["kind"], summary["pairs_used"]) == (1, "full", 2)
    out = Path(summary["output_dir"])
    assert not (out / "adapter_config.json").exists()
    _trained(_moved(folder, out), vision=True)


def _deepspeed_run(tmp_path: Path, folder: Path, name: str, **train) -> Path:
    """A 2-rank ZeRO-3 train job (CPU ranks, gloo) through the deepspeed launcher: its output folder."""
    from backend.launch import train_command
    from core.config import TrainConfig

    run_dir = make_run(tmp_path, folder, make_pairs(tmp_path, 2), max_steps=1, base_model=name, batch_size=1,
                       launcher="deepspeed", num_processes=2, zero_stage=3, **train)
    cfg = TrainConfig(**json.loads((run_dir / "config.json").read_text())["train"])
    events, _ = run_launcher(train_command(run_dir, cfg, master_port=free_port()))
    logs = " | ".join(e["message"] for e in events if e["event"] == "log")
    assert "world size 2, DeepSpeed ZeRO-3" in logs
    done = of(events, "done")
    assert len(done) == 1 and done[0]["summary"]["steps"] == 1  # rank 1 stays silent
    out = Path(done[0]["summary"]["output_dir"])
    assert json.loads((out / "train_config.json").read_text())["world_size"] == 2
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_zero3_lora_on_two_cpu_ranks(family_dirs, tmp_path, name):
    """The adapter ZeRO-3 gathers from 2 ranks (LoRA + the projector in full) merges into the family's model.
    Merged here in the test process (backend.jobs.merge.merge, what the job's fresh merge process runs):
    the fresh process costs 12 s a family, and tests/test_deepspeed.py covers it."""
    from backend.jobs.merge import merge

    folder = family_dirs[name]
    out = _deepspeed_run(tmp_path, folder, name, merge=False)
    assert json.loads((out / "meta.json").read_text())["kind"] == "adapter"
    merged = merge(out, str(folder), tmp_path / "merged")
    assert families.family_of(merged) == families.family_of(folder)
    _trained(_moved(folder, merged), vision=False)


@pytest.mark.slow
def test_zero3_full_finetune_on_two_cpu_ranks(family_dirs, tmp_path):
    name = "tiny-qwen2-vl"
    folder = family_dirs[name]
    out = _deepspeed_run(tmp_path, folder, name, lora=False)
    assert json.loads((out / "meta.json").read_text())["kind"] == "full"
    _trained(_moved(folder, out), vision=True)
