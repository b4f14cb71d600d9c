"""The reference log-prob cache on `tiny`: real TRL, real models, real job subprocesses.

Cached training must give the same losses and rewards as TRL's own in-loop reference forward, must not
run the reference at all when every pair is cached, and a retried train job must compute no reference
forward. The TRL internals the cache relies on are pinned, so a TRL upgrade fails here by name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from backend import dpo, ref_cache
from core.config import TrainConfig
from core.errors import JobFailed
from tests.helpers import free_port, make_pairs, make_run, of, run_job, run_launcher

TOL = 1e-5
STEPS = 3  # 6 pairs, batch 2


# ---- pinned TRL internals ---------------------------------------------------------------------------------


def test_trl_internals_the_cache_relies_on_are_unchanged():
    dpo.check_trl_internals.cache_clear()
    dpo.check_trl_internals()  # raises JobFailed naming the member otherwise


def test_the_internals_check_names_the_changed_member(monkeypatch):
    monkeypatch.setitem(dpo.TRL_SOURCE, "DPOTrainer._compute_loss", ('inputs["ref_logps_renamed"]',))
    dpo.check_trl_internals.cache_clear()
    with pytest.raises(JobFailed, match=r"TRL changed: DPOTrainer\._compute_loss no longer contains"):
        dpo.check_trl_internals()
    monkeypatch.undo()
    monkeypatch.setitem(dpo.TRL_SIGNATURES, "DPOTrainer.compute_ref_log_probs", ("self", "model", "batch"))
    dpo.check_trl_internals.cache_clear()
    with pytest.raises(JobFailed, match=r"TRL changed: DPOTrainer\.compute_ref_log_probs\(.*no longer has the param"):
        dpo.check_trl_internals()
    monkeypatch.undo()
    dpo.check_trl_internals.cache_clear()


def test_trl_still_refuses_precompute_for_vision_data(tiny_model_dir, tmp_path):
    """If this starts passing through, TRL caches vision reference log-probs itself: reconsider
    backend.dpo.CachedRefDPOTrainer."""
    from trl import DPOConfig, DPOTrainer

    from backend.models import load_model, load_processor

    processor = load_processor(tiny_model_dir)
    dataset, _ = dpo.build_dataset(make_pairs(tmp_path, 2), processor, TrainConfig())
    args = DPOConfig(output_dir=str(tmp_path / "out"), precompute_ref_log_probs=True, use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="`precompute_ref_log_probs=True` is not supported for vision datasets"):
        DPOTrainer(model=load_model(tiny_model_dir), args=args, train_dataset=dataset, processing_class=processor)


# ---- in-process: cached == uncached, and no reference forward with a full cache -----------------------------


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    from backend.models import load_processor

    root = tmp_path_factory.mktemp("refcache")
    processor = load_processor(tiny_model_dir)
    pairs = make_pairs(root, 6)
    return root, processor, pairs


def train_once(name: str, setup, model_dir: Path, *, lora: bool, cache=None, ref_dir: Path | None = None,
               reference_available: bool = True, epochs: float = 1.0):
    """One in-process training run; returns (metrics rows, forward calls of the counted module)."""
    from backend.models import load_model

    root, processor, pairs = setup
    cfg = TrainConfig(lora=lora, lora_r=4, lora_alpha=8, batch_size=2, epochs=epochs,
                      learning_rate=1e-3 if lora else 1e-4)
    key = None
    if cache is not None:
        context = ref_cache.make_context(ref_dir or model_dir, processor, dtype="float32", max_length=cfg.max_length,
                                         max_completion_length=cfg.max_completion_length)
        key = context.row_key
    dataset, _ = dpo.build_dataset(pairs, processor, cfg, ref_key=key)
    args = dpo.dpo_config(cfg, output_dir=root / name, device="cpu", dtype="float32")
    model = load_model(model_dir)
    ref_model = load_model(ref_dir) if ref_dir is not None else None
    counted = ref_model if ref_model is not None else model
    calls = []
    counted.register_forward_hook(lambda module, args, output: calls.append(1))
    metrics = root / f"{name}.jsonl"
    metrics.unlink(missing_ok=True)
    trainer = dpo.build_trainer(model, ref_model, processor, dataset, args,
                                dpo.lora_config(cfg, model) if lora else None, metrics, ref_cache=cache,
                                reference_available=reference_available)
    trainer.train()
    return [json.loads(line) for line in metrics.read_text().splitlines()], len(calls)


def assert_same_curve(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, len(a) + 1))
    for x, y in zip(a, b, strict=True):
        for k in ("loss", "rewards_chosen", "rewards_rejected", "margin"):
            assert abs(x[k] - y[k]) <= TOL, (k, x, y)
    assert a[-1]["margin"] != 0  # the curves compared are of a model that learns


def test_lora_cached_loss_equals_uncached_and_skips_the_reference_forward(setup, tiny_model_dir):
    root = setup[0]
    plain, plain_calls = train_once("lora-plain", setup, tiny_model_dir, lora=True)
    cold_cache = ref_cache.RefLogpCache(root / "lora-cache")
    cold, cold_calls = train_once("lora-cold", setup, tiny_model_dir, lora=True, cache=cold_cache)
    warm_cache = ref_cache.RefLogpCache(root / "lora-cache")
    warm, warm_calls = train_once("lora-warm", setup, tiny_model_dir, lora=True, cache=warm_cache)

    assert_same_curve(plain, cold)
    assert_same_curve(plain, warm)
    # with LoRA the reference is the policy with its adapter disabled: 2 forwards per step, 1 when cached
    assert (plain_calls, cold_calls, warm_calls) == (2 * STEPS, 2 * STEPS, STEPS)
    assert cold_cache.stats.as_dict() == {"loaded": 0, "damaged": 0, "served": 0, "computed": 6, "ref_forwards": 3}
    assert warm_cache.stats.as_dict() == {"loaded": 6, "damaged": 0, "served": 6, "computed": 0, "ref_forwards": 0}


def test_full_cache_never_calls_the_reference_model(setup, tiny_model_dir):
    root = setup[0]
    plain, plain_ref_calls = train_once("full-plain", setup, tiny_model_dir, lora=False, ref_dir=tiny_model_dir)
    cold, cold_ref_calls = train_once("full-cold", setup, tiny_model_dir, lora=False, ref_dir=tiny_model_dir,
                                      cache=ref_cache.RefLogpCache(root / "full-cache"))
    warm, warm_ref_calls = train_once("full-warm", setup, tiny_model_dir, lora=False, ref_dir=tiny_model_dir,
                                      cache=ref_cache.RefLogpCache(root / "full-cache"))
    assert (plain_ref_calls, cold_ref_calls, warm_ref_calls) == (STEPS, STEPS, 0)
    assert_same_curve(plain, cold)
    assert_same_curve(plain, warm)
    # the job's path when every pair is cached: no reference model at all (a weightless stand-in)
    bare, policy_calls = train_once("full-bare", setup, tiny_model_dir, lora=False, reference_available=False,
                                    cache=ref_cache.RefLogpCache(root / "full-cache"))
    assert_same_curve(plain, bare)
    assert policy_calls == STEPS


def test_second_epoch_is_served_from_what_the_first_computed(setup, tiny_model_dir):
    cache = ref_cache.RefLogpCache(setup[0] / "two-epochs")
    rows, calls = train_once("two-epochs", setup, tiny_model_dir, lora=True, cache=cache, epochs=2)
    assert len(rows) == 2 * STEPS and calls == 2 * STEPS + STEPS  # reference forwards in epoch 1 only
    assert (cache.stats.computed, cache.stats.served, cache.stats.ref_forwards) == (6, 6, STEPS)


def test_a_miss_without_a_loaded_reference_fails_loudly(setup, tiny_model_dir):
    with pytest.raises(JobFailed, match="have no cached reference log-probs, but the reference model was not loaded"):
        train_once("miss", setup, tiny_model_dir, lora=True, reference_available=False,
                   cache=ref_cache.RefLogpCache(setup[0] / "empty-cache"))
    stand_in = dpo.no_reference_model(None)
    with pytest.raises(JobFailed, match="was not loaded because every pair"):
        stand_in(input_ids=None)


# ---- keys and storage -------------------------------------------------------------------------------------


def test_keys_follow_the_reference_processor_settings_and_pair(setup, tiny_model_dir, tmp_path):
    _, processor, pairs = setup
    row = {"prompt": "p", "chosen": "c", "rejected": "r"}
    image = pairs[0]["image_path"]

    def key(folder=tiny_model_dir, proc=processor, row=row, image=image, max_length=1024):
        ctx = ref_cache.make_context(folder, proc, dtype="float32", max_length=max_length, max_completion_length=128)
        return ctx.key(ref_cache.pair_fingerprint(image, row))

    base = key()
    assert key() == base
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)  # copy2 keeps mtimes: the same checkpoint
    assert key(copy) == base
    retrained = tmp_path / "retrained"
    shutil.copytree(tiny_model_dir, retrained)
    weights = retrained / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(copy.joinpath("model.safetensors").stat().st_atime_ns,
                          copy.joinpath("model.safetensors").stat().st_mtime_ns))  # same mtime, other content
    assert key(retrained) != base
    os.utime(copy / "model.safetensors")  # rewritten in place: new mtime
    assert key(copy) != base

    from backend.models import load_processor

    other = load_processor(tiny_model_dir)
    other.chat_template = other.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert key(proc=other) != base
    assert key(max_length=512) != base
    assert key(row={**row, "chosen": "c2"}) != base
    assert key(image=pairs[1]["image_path"]) != base  # another image (different bytes)


def test_parts_merge_exact_floats_and_a_torn_line_is_skipped(tmp_path):
    import torch

    a, b = ref_cache.RefLogpCache(tmp_path), ref_cache.RefLogpCache(tmp_path)  # e.g. two ranks
    value = torch.tensor([-12.345678], dtype=torch.float32).item()
    a.put_many([("k1", value, -1.5, {}), ("k1", value, -1.5, {})])
    b.put_many([("k2", -2.0, -3.0, {"prompt_id": "p2"})])
    parts = sorted(tmp_path.glob("part-*.jsonl"))
    assert len(parts) == 2 and sum(len(p.read_text().splitlines()) for p in parts) == 2
    with parts[0].open("a") as f:
        f.write('{"key": "k3", "chosen": -1.0, "rej')  # a write cut short by kill -9
    merged = ref_cache.RefLogpCache(tmp_path)
    assert merged.get("k1") == (value, -1.5) and merged.get("k2") == (-2.0, -3.0) and merged.get("k3") is None
    assert torch.tensor([merged.get("k1")[0]], dtype=torch.float32).item() == value
    assert merged.stats.loaded == 2 and merged.stats.damaged == 1
    assert merged.missing(["k1", "k3"]) == ["k3"]


# ---- the job: a retry computes no reference forward ----------------------------------------------------------


def cache_summary(events: list[dict]) -> dict:
    return of(events, "done")[0]["summary"]["ref_cache"]


def test_retried_train_job_computes_no_reference_forward(tiny_model_dir, tmp_path):
    pairs = make_pairs(tmp_path, 6)
    cache_dir = tmp_path / "r001" / "ref_cache"
    run_dir = make_run(tmp_path, tiny_model_dir, pairs, merge=False, ref_cache_dir=str(cache_dir))
    rc, first, stderr = run_job(run_dir)
    assert rc == 0, stderr[-3000:]
    rc, retry, stderr = run_job(run_dir)  # the same round folder again, as `round resume` does
    assert rc == 0, stderr[-3000:]

    assert cache_summary(first) == {"pairs_cached_at_start": 0, "reference_available": True, "loaded": 0, "damaged": 0,
                                    "served": 0, "computed": 6, "ref_forwards": STEPS}
    assert cache_summary(retry) == {"pairs_cached_at_start": 6, "reference_available": False, "loaded": 6, "damaged": 0,
                                    "served": 6, "computed": 0, "ref_forwards": 0}
    logs = " | ".join(e["message"] for e in of(retry, "log"))
    assert "reference log-probs: 6 of 6 pairs cached" in logs and "0 pairs computed in 0 reference forwards" in logs
    assert_same_curve(of(first, "metrics"), of(retry, "metrics"))
    meta = json.loads((Path(of(retry, "done")[0]["summary"]["output_dir"]) / "meta.json").read_text())
    assert meta["ref_cache"]["ref_forwards"] == 0 and meta["config"]["ref_cache_dir"] == str(cache_dir)


def test_full_finetune_retry_does_not_load_a_separate_reference(tiny_model_dir, tmp_path):
    """reference = initial: the reference is another folder; cached, it is never loaded."""
    c0 = tmp_path / "c0"
    shutil.copytree(tiny_model_dir, c0)
    pairs = make_pairs(tmp_path, 4)
    run_dir = make_run(tmp_path, tiny_model_dir, pairs, ref_model_path=c0, lora=False, learning_rate=1e-4,
                       reference="initial", ref_cache_dir=str(tmp_path / "ref_cache"))
    rc, first, stderr = run_job(run_dir)
    assert rc == 0, stderr[-3000:]
    rc, retry, stderr = run_job(run_dir)
    assert rc == 0, stderr[-3000:]
    loaded = [e["message"] for e in of(first, "log") + of(retry, "log") if e["message"].startswith("loaded policy")]
    assert loaded[0].startswith("loaded policy and reference in") and loaded[1].startswith("loaded policy in")
    assert cache_summary(retry)["ref_forwards"] == 0 and cache_summary(retry)["computed"] == 0
    assert_same_curve(of(first, "metrics"), of(retry, "metrics"))


@pytest.mark.slow
def test_zero3_two_ranks_share_the_cache_and_agree_on_reference_forwards(tiny_model_dir, tmp_path):
    """Each rank appends its own part file; a rank whose pairs are cached still joins the (collective)
    reference forward of a rank with a miss, so a half-filled cache neither hangs nor changes the losses."""
    from backend.launch import train_command

    pairs = make_pairs(tmp_path, 6)
    cache_dir = tmp_path / "ref_cache"
    run_dir = make_run(tmp_path, tiny_model_dir, pairs, batch_size=1, launcher="deepspeed", num_processes=2,
                       zero_stage=3, max_steps=3, merge=False, ref_cache_dir=str(cache_dir))
    cfg = TrainConfig(launcher="deepspeed", num_processes=2, zero_stage=3)
    cold, _ = run_launcher(train_command(run_dir, cfg, master_port=free_port()))
    parts = sorted(cache_dir.glob("part-*.jsonl"))
    assert len(parts) == 2 and all(len(p.read_text().splitlines()) == 3 for p in parts)
    parts[1].unlink()  # one rank's pairs stay cached, the other's are gone: every step mixes both
    half, _ = run_launcher(train_command(run_dir, cfg, master_port=free_port()))
    # (a fully cached run is the single-process tests' case; a third launch here would add ~35 s)
    assert cache_summary(cold)["ref_forwards"] == 3 and cache_summary(half)["ref_forwards"] == 3
    # rank 0 reports: whichever half it holds, it ran all 3 reference forwards (they are collective)
    assert cache_summary(half)["pairs_cached_at_start"] == 3
    for a, b in zip(of(cold, "metrics"), of(half, "metrics"), strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["margin"] - b["margin"]) < 1e-4
