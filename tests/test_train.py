"""The DPO training job on the tiny model: real subprocesses, real TRL, no mocks."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tests.helpers import make_pairs, make_run, of, run_job, weight


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_model_dir) -> Path:
    dest = tmp_path_factory.mktemp("base") / "c0"
    shutil.copytree(tiny_model_dir, dest)
    return dest


@pytest.fixture(scope="module")
def round1(tmp_path_factory, base):
    """One LoRA + merge training of the tiny model on 6 usable pairs (+1 identical, +1 too long)."""
    root = tmp_path_factory.mktemp("round1")
    pairs = make_pairs(root, 8)
    pairs[6]["rejected_text"] = pairs[6]["chosen_text"]  # identical answers
    pairs[7]["question"] = "Describe the scene in detail. " * 40  # prompt alone is over max_length
    run_dir = make_run(root, base, pairs, max_length=160, loss=["sigmoid"])
    rc, events, stderr = run_job(run_dir)
    assert rc == 0, stderr[-3000:]
    return run_dir, events


def test_lora_merge_streams_metrics_and_writes_checkpoint(round1, base):
    run_dir, events = round1
    metrics = of(events, "metrics")
    assert [m["step"] for m in metrics] == [1, 2, 3]  # 6 pairs, batch 2, one epoch
    for m in metrics:
        assert set(m) == {"event", "step", "epoch", "loss", "rewards_chosen", "rewards_rejected", "margin",
                          "accuracy", "lr"}
        assert math.isfinite(m["loss"]) and m["lr"] > 0
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert of(events, "progress")[-1] == {"event": "progress", "done": 3, "total": 3, "unit": "steps"}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{k: v for k, v in m.items() if k != "event"} for m in metrics]

    done = of(events, "done")
    assert len(done) == 1 and events[-1] is done[0]
    summary = done[0]["summary"]
    out = Path(summary["output_dir"])
    assert summary["pairs_used"] == 6 and summary["pairs_skipped"] == 2 and summary["steps"] == 3
    assert summary["kind"] == "merged" and math.isfinite(summary["train_loss"]) and summary["seconds"] > 0
    assert not out.with_name(out.name + ".tmp").exists() and not (run_dir / "trainer").exists()

    meta = json.loads((out / "meta.json").read_text())
    assert meta["parent_id"] == "c0" and meta["checkpoint_id"] == "c1" and meta["round_id"] == 1
    assert meta["pairs_hash"] == "hash-c1" and meta["base_model"] == "tiny" and meta["kind"] == "merged"
    assert meta["skipped"] == {"identical": 1, "too_long": 1} and meta["pairs_used"] == 6
    assert set(meta["versions"]) == {"torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "datasets"}
    assert meta["versions"]["trl"] == "1.16.0"
    assert meta["config"]["lora_r"] == 4 and meta["config"]["beta"] == 0.1 and meta["config"]["merge"] is True
    train_config = json.loads((out / "train_config.json").read_text())
    assert train_config == meta["config"]
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "adapter" / "meta.json").read_text())["kind"] == "adapter"
    assert not (out / "adapter_config.json").exists()  # top level is a plain model folder

    trained, start = weight(out), weight(base)
    assert trained.shape == start.shape and not trained.equal(start)


def test_merged_checkpoint_reloads_and_generates(round1):
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = Path(of(round1[1], "done")[0]["summary"]["output_dir"])
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.open(next((round1[0].parent / "images").iterdir())).convert("RGB")
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert ids.shape[1] > inputs["input_ids"].shape[1]


def test_round2_trains_from_merged_checkpoint_against_initial_reference(round1, base, tmp_path):
    c1 = Path(of(round1[1], "done")[0]["summary"]["output_dir"])
    run_dir = make_run(tmp_path, c1, make_pairs(tmp_path, 4), ref_model_path=base, checkpoint_id="c2",
                       parent_id="c1", reference="initial", max_steps=1)
    rc, events, stderr = run_job(run_dir)
    assert rc == 0, stderr[-3000:]
    assert "and reference" in " ".join(e["message"] for e in of(events, "log"))  # a separate reference model
    first = of(events, "metrics")[0]
    # the policy c1 already differs from the initial reference, so step 1 is no longer exactly log 2
    assert first["loss"] != pytest.approx(math.log(2), abs=1e-6) and first["margin"] != 0
    c2 = tmp_path / "checkpoints" / "c2"
    assert json.loads((c2 / "meta.json").read_text())["parent_id"] == "c1"
    assert not weight(c2).equal(weight(c1))


def test_full_finetune_writes_full_weights(base, tmp_path):
    run_dir = make_run(tmp_path, base, make_pairs(tmp_path, 4), lora=False, learning_rate=1e-4, max_steps=1)
    rc, events, stderr = run_job(run_dir)
    assert rc == 0, stderr[-3000:]
    summary = of(events, "done")[0]["summary"]
    out = Path(summary["output_dir"])
    assert summary["kind"] == "full" and summary["steps"] == 1
    assert not (out / "adapter").exists() and not (out / "training_args.bin").exists()
    vision = "vision_tower.encoder.layers.0.self_attn.q_proj.weight"
    assert not weight(out).equal(weight(base))
    assert weight(out, vision).shape == weight(base, vision).shape
    assert json.loads((out / "meta.json").read_text())["kind"] == "full"


def test_no_usable_pairs_is_a_clear_error(base, tmp_path):
    pairs = make_pairs(tmp_path, 3)
    for p in pairs:
        p["rejected_text"] = p["chosen_text"]
    run_dir = make_run(tmp_path, base, pairs)
    rc, events, _ = run_job(run_dir)
    assert rc == 1
    assert events[-1]["event"] == "error"
    assert events[-1]["message"].startswith("no pairs to train on: 3 pair(s) given, 3 with identical answers")
    assert not (tmp_path / "checkpoints" / "c1").exists()


def test_bad_config_key_is_named(base, tmp_path):
    run_dir = make_run(tmp_path, base, make_pairs(tmp_path, 2), beta=-1)
    rc, events, _ = run_job(run_dir)
    assert rc == 2 and "beta" in events[-1]["message"] and events[-1]["event"] == "error"


def test_adapter_folder_or_foreign_output_is_refused(round1, tmp_path):
    from backend.jobs.train import train
    from core.errors import JobFailed

    c1 = Path(of(round1[1], "done")[0]["summary"]["output_dir"])
    run_dir = make_run(tmp_path / "a", c1 / "adapter", make_pairs(tmp_path, 2), checkpoint_id="c2")
    with pytest.raises(JobFailed, match="is a LoRA adapter folder, not full weights"):
        train(run_dir)
    run_dir = make_run(tmp_path / "b", c1, make_pairs(tmp_path, 2), checkpoint_id="c9")
    config = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps({**config, "output_dir": str(c1)}))
    with pytest.raises(JobFailed, match="already exists and is not checkpoint c9"):
        train(run_dir)
    assert json.loads((c1 / "meta.json").read_text())["checkpoint_id"] == "c1"


# ---- in-process: dataset building and the loss registry -------------------------------------------------


def test_long_answers_are_capped_and_long_prompts_skipped(tiny_model_dir, tmp_path):
    from backend import dpo
    from backend.models import load_processor
    from core.config import TrainConfig

    processor = load_processor(tiny_model_dir)
    pairs = make_pairs(tmp_path, 4)
    pairs[0]["chosen_text"] = "The image shows a cat sitting on a red chair next to a window. " * 30
    pairs[1]["question"] = "Describe the scene in detail. " * 40
    pairs[2]["rejected_text"] = pairs[2]["chosen_text"] + "  "
    cfg = TrainConfig(max_completion_length=20, max_length=80)  # the normal answers have 12-16 tokens
    dataset, stats = dpo.build_dataset(pairs, processor, cfg)
    assert (stats.total, stats.used, stats.skipped) == (4, 2, {"identical": 1, "too_long": 1})
    assert stats.truncated_answers == 1 and stats.longest <= 80
    by_question = {row["prompt"][0]["content"][1]["text"]: row for row in dataset}
    capped = by_question[pairs[0]["question"]]["chosen"][0]["content"][0]["text"]
    assert pairs[0]["chosen_text"].startswith(capped)
    assert len(processor.tokenizer(capped, add_special_tokens=False)["input_ids"]) <= 20
    assert dataset[0]["images"][0].mode == "RGB"

    _, loose_stats = dpo.build_dataset(pairs, processor, TrainConfig(max_completion_length=20, max_length=1024))
    assert loose_stats.used == 3 and loose_stats.skipped["too_long"] == 0


def test_unknown_loss_and_weight_mismatch_are_refused():
    from backend import dpo
    from core.config import TrainConfig
    from core.errors import JobFailed

    with pytest.raises(JobFailed, match="unknown loss type 'kto'.*sigmoid, ipo, hinge, robust, sft"):
        dpo.loss_args(TrainConfig.model_construct(loss=["kto"]))  # loading a TrainConfig refuses the name
    with pytest.raises(JobFailed, match="one weight per loss type"):
        dpo.loss_args(TrainConfig(loss=["sigmoid", "sft"], loss_weights=[1.0]))


BETA = 0.1
# First-step loss of each registry entry: at step 1 the policy equals the reference, so the DPO margin is 0.
FIRST_STEP = {
    "sigmoid": (["sigmoid"], None, 0.0, math.log(2)),
    "ipo": (["ipo"], None, 0.0, (1 / (2 * BETA)) ** 2),
    "hinge": (["hinge"], None, 0.0, 1.0),
    "robust": (["robust"], None, 0.2, math.log(2)),
    "sft": (["sft"], None, 0.0, None),
    "sigmoid+sft": (["sigmoid", "sft"], [1.0, 0.5], 0.0, None),
}


@pytest.fixture(scope="module")
def one_step(tiny_model_dir, tmp_path_factory):
    """Train one step in-process with a given loss setup; returns the logged step-1 row."""
    from backend import dpo
    from backend.models import load_model, load_processor
    from core.config import TrainConfig

    root = tmp_path_factory.mktemp("losses")
    pairs = make_pairs(root, 2)
    processor = load_processor(tiny_model_dir)

    def run(loss, weights, smoothing):
        cfg = TrainConfig(loss=loss, loss_weights=weights, label_smoothing=smoothing, beta=BETA, lora_r=4,
                          lora_alpha=8, batch_size=2)
        name = "+".join(loss)
        args = dpo.dpo_config(cfg, output_dir=root / name, device="cpu", dtype="float32", max_steps=1)
        assert args.loss_type == [dpo.LOSSES[n].trl_name for n in loss] and args.label_smoothing == smoothing
        dataset, _ = dpo.build_dataset(pairs, processor, cfg)
        model = load_model(tiny_model_dir)
        metrics_path = root / f"{name}.jsonl"
        trainer = dpo.build_trainer(model, None, processor, dataset, args, dpo.lora_config(cfg, model),
                                    metrics_path)
        trainer.train()
        return json.loads(metrics_path.read_text().splitlines()[0])

    return run


@pytest.mark.parametrize("setup", list(FIRST_STEP))
def test_each_loss_type_trains_one_step(one_step, setup):
    loss, weights, smoothing, expected = FIRST_STEP[setup]
    row = one_step(loss, weights, smoothing)
    assert row["step"] == 1 and math.isfinite(row["loss"])
    if expected is not None:
        assert row["loss"] == pytest.approx(expected, rel=1e-5)
    else:
        assert row["loss"] > 1.0  # the NLL of the chosen answer under a random model
    if setup == "sigmoid+sft":
        sft_only = one_step(["sft"], None, 0.0)["loss"]
        assert row["loss"] == pytest.approx(math.log(2) + 0.5 * sft_only, rel=1e-5)


def test_registry_covers_the_configured_loss_names():
    from backend import dpo
    from core.config import TrainConfig

    documented = TrainConfig.model_fields["loss"].description
    assert all(name in documented for name in dpo.LOSSES)
    assert {"sigmoid", "ipo", "hinge", "robust", "sft"} <= set(dpo.LOSSES)
