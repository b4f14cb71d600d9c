"""The preflight (issue 15): the memory estimator on known cases, each doctor check's verdict, `prefloop doctor`,
and `round start` stopping on a failed check before any job."""

from __future__ import annotations

import pytest

from backend import doctor, memory
from core import config as cfgmod

GIB = memory.GIB


def llava_7b_config():
    """LLaVA-1.5-7B's architecture (Vicuna-7B + CLIP ViT-L/336 + 2-layer MLP projector), no weights."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000)


@pytest.fixture(scope="module")
def shape_7b():
    return memory.shape_of(llava_7b_config())


@pytest.mark.parametrize("params,largest,gpus,stage", [(7_000_000_000, 130_000_000, 8, 3), (7_000_000_000, 1, 1, 2),
                                                        (2_500_000_000, 20_000_000, 4, 3), (10**6, 10**5, 2, 2)])
def test_model_states_follow_deepspeeds_estimators(params, largest, gpus, stage):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    plan = memory.RunPlan(lora=False, zero_stage=stage, gpus_per_node=gpus)
    if stage == 3:
        _, want, _ = estimate_zero3_model_states_mem_needs(params, largest, num_gpus_per_node=gpus, cpu_offload=False,
                                                           cpu_offload_params=False)
    else:
        _, want = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=gpus, cpu_offload=False)
    assert memory._model_states(params, largest, plan) == want


def test_known_cases_7b(shape_7b):
    assert 7.0e9 < shape_7b.total_params < 7.1e9  # LLaVA-1.5-7B: 7.06B
    # LoRA r=1024 on the LM's attention + MLP: ~2.5B trainable (the README once said "one 40 GB GPU")
    lora = memory.estimate(shape_7b, memory.RunPlan(lora=True, lora_r=1024, train_projector=False, zero_stage=3,
                                                    micro_batch=1, seq_len=1024, gradient_checkpointing=True))
    assert 2.4e9 < lora.trainable_params < 2.7e9
    assert lora.total > 40 * GIB and lora.reference == 0
    # full fine-tune, ZeRO-3 on 8 GPUs: 18 bytes a parameter spread over 8 GPUs + one gathered layer + reference
    full = memory.estimate(shape_7b, memory.RunPlan(lora=False, zero_stage=3, gpus_per_node=8, micro_batch=1,
                                                    seq_len=2048, gradient_checkpointing=True))
    assert full.model_states == 4 * shape_7b.largest_layer_params + int(18 * shape_7b.total_params / 8)
    assert full.reference == 2 * shape_7b.total_params // 8 and 15 * GIB < full.total < 40 * GIB
    # the same on 1 GPU does not fit an 80 GB card
    one = memory.estimate(shape_7b, memory.RunPlan(lora=False, zero_stage=3, gpus_per_node=1, micro_batch=1,
                                                   seq_len=2048, gradient_checkpointing=True))
    assert one.total > 80 * GIB


def test_activation_allowance_moves_the_right_way(shape_7b):
    def act(**kw):
        return memory.estimate(shape_7b, memory.RunPlan(lora=True, **kw)).activations

    assert act(seq_len=2048) == 2 * act(seq_len=1024)
    assert act(micro_batch=4) == 4 * act(micro_batch=1)
    assert act(gradient_checkpointing=True) < act(gradient_checkpointing=False) / 5
    frozen2 = memory.estimate(shape_7b, memory.RunPlan(lora=True, zero_stage=2, gpus_per_node=8)).frozen_weights
    frozen3 = memory.estimate(shape_7b, memory.RunPlan(lora=True, zero_stage=3, gpus_per_node=8)).frozen_weights
    assert abs(frozen3 * 8 - frozen2) < 8


def _ctx(tmp_path, policy_path, **changes):
    cfg = cfgmod.update(cfgmod.WorkspaceConfig(), changes)
    return doctor.Context(config=cfg, root=tmp_path, policy_path=str(policy_path), gpus=0, gpu_bytes=0)


def test_each_check_fails_with_its_fix(tmp_path, tiny_model_dir, monkeypatch):
    big = tmp_path / "llava-7b"
    llava_7b_config().save_pretrained(big)
    ctx = _ctx(tmp_path, big, **{"train.lora": False, "train.launcher": "deepspeed", "train.num_processes": 4,
                                 "train.gradient_checkpointing": True})
    ctx.gpus, ctx.gpu_bytes = 2, 24 * GIB
    gpus = doctor.check_gpus(ctx)
    assert gpus.status == "fail" and "sees 2 CUDA GPU(s)" in gpus.fix
    ctx.config = cfgmod.update(ctx.config, {"train.num_processes": 2})
    mem = doctor.check_memory(ctx)
    assert mem.status == "fail" and "the smallest GPU has 24 GiB" in mem.found and "LoRA" in mem.fix
    ctx.gpu_bytes = 1000 * GIB
    assert doctor.check_memory(ctx).status == "ok"

    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    gem = doctor.check_gemini_key(_ctx(tmp_path, tiny_model_dir, **{"judges.default": ["gemini"]}))
    assert gem.status == "fail" and "GEMINI_API_KEY" in gem.fix
    assert doctor.check_gemini_key(_ctx(tmp_path, tiny_model_dir)).status == "skip"
    monkeypatch.setenv("GEMINI_API_KEY", "k")
    assert doctor.check_gemini_key(_ctx(tmp_path, tiny_model_dir, **{"judges.default": ["gemini"]})).status == "ok"

    lengths = _ctx(tmp_path, tiny_model_dir, **{"train.max_length": 100})
    lengths.pairs, lengths.longest_pair, lengths.too_long = 3, 140, 3
    assert doctor.check_lengths(lengths).status == "fail"
    lengths.too_long = 1
    assert doctor.check_lengths(lengths).status == "warn"

    missing = doctor.check_policy(_ctx(tmp_path, tmp_path / "nope"))
    assert missing.status == "fail" and "nope" in missing.found
    assert doctor.check_policy(_ctx(tmp_path, tiny_model_dir)).status == "ok"


def test_doctor_command_and_round_start_stop_on_a_failure(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from app.cli import main
    from tests.helpers import make_ws, q

    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    ws = make_ws(tmp_path, tiny_model_dir)
    assert main(["doctor", "-w", str(ws)]) == 0
    out = capsys.readouterr().out
    assert "OK    policy loads" in out and "GPU memory" in out
    assert main(["doctor", "-w", str(ws), "--set", 'judges.default=["gemini"]']) == 1
    out = capsys.readouterr().out
    assert "FAIL  Gemini key" in out and "round start` stops on them" in out
    assert "OK    judge cost" in out and "5 prompts" in out and "online ~$" in out and "batch ~$" in out
    assert main(["round", "start", "-w", str(ws), "--quiet", "--set", 'judges.default=["gemini"]']) == 2
    assert "preflight checks failed" in capsys.readouterr().err
    assert q(ws, "SELECT count(*) FROM candidates")[0][0] == 0, "no job may run before the preflight"


def test_smoke_runs_generate_train_and_merge_on_this_machine(tmp_path, capsys):
    from app.cli import main

    assert main(["doctor", "--smoke", "--keep", str(tmp_path / "smoke")]) == 0
    out = capsys.readouterr().out
    assert "OK      generate (hf)" in out and "4 candidates" in out
    assert "1 step(s), merged weights" in out
    assert "vllm is not installed" in out and "0 GPU(s) seen, 2 needed" in out
    assert "smoke run: 2 ok, 0 failed, 2 skipped" in out
    assert (tmp_path / "smoke" / "checkpoint-0" / "config.json").is_file()
