"""k-candidate generation: the hf engine on tiny, the vllm request builders, and the generate job."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
from PIL import Image

from backend.engines import ENGINES, EngineSpec, GenRequest, HFEngine, SamplingSpec, make_engine
from backend.engines import vllm as vllm_engine
from backend.jobs.configs import GenerateJobConfig, load_job_config
from backend.jobs.generate import SCHEMA, candidate_id
from backend.jobs.generate import main as generate_main
from core.errors import ConfigError, ModelNotAvailable, UsageError
from tests.helpers import REPO, make_image
from tests.helpers import write_generate_run as write_run

HAS_VLLM = importlib.util.find_spec("vllm") is not None
QUESTIONS = ["What is in the image?", "What color is the car?", "How many apples are there?"]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = HFEngine(EngineSpec(str(tiny_model_dir), batch_size=2))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def requests_(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    return [GenRequest(question=q, image=Image.open(make_image(d / f"{i}.png", color=(60 * i, 90, 200))).convert("RGB"),
                       seed=100 + i, request_id=f"p{i}") for i, q in enumerate(QUESTIONS)]


def texts(outputs):
    return [[o.text for o in outs] for outs in outputs]


# ---- the hf engine -------------------------------------------------------------------------------

def test_registry_names_the_engines():
    assert set(ENGINES) == {"hf", "vllm"}
    with pytest.raises(UsageError, match="choose one of: hf, vllm"):
        make_engine("sglang", EngineSpec("x"))


def test_k_samples_per_request(engine, requests_):
    out = engine.generate(requests_, SamplingSpec(k=4, temperature=0.9, top_p=0.95, max_new_tokens=10))
    assert [len(o) for o in out] == [4, 4, 4]
    for outs in out:
        assert len({o.text for o in outs}) > 1, "k samples of one prompt should differ"
        for o in outs:
            assert 1 <= o.num_tokens <= 10 and o.finish_reason in ("stop", "length")
            assert o.finish_reason == "stop" or o.num_tokens == 10
            assert "<|im_end|>" not in o.text and "<pad>" not in o.text and o.text == o.text.strip()


def test_greedy_gives_one_output_per_request(engine, requests_):
    params = SamplingSpec(k=5, temperature=0.0, max_new_tokens=8)
    out = engine.generate(requests_, params)
    assert [len(o) for o in out] == [1, 1, 1]
    assert params.record() == {"temperature": 0.0, "top_p": 0.9, "max_new_tokens": 8, "k": 1, "do_sample": False}
    assert texts(engine.generate(requests_, params)) == texts(out)


def test_same_prompts_and_seeds_give_the_same_outputs(engine, requests_):
    params = SamplingSpec(k=3, temperature=1.0, max_new_tokens=12)
    first = engine.generate(requests_, params)
    assert engine.generate(requests_, params) == first
    reseeded = [GenRequest(question=r.question, image=r.image, seed=r.seed + 1) for r in requests_]
    assert texts(engine.generate(reseeded, params)) != texts(first)


def test_min_new_tokens_forces_the_length(engine, requests_):
    out = engine.generate(requests_[:2], SamplingSpec(k=2, max_new_tokens=6, min_new_tokens=6))
    assert all(o.num_tokens == 6 for outs in out for o in outs)


def test_text_only_and_prebuilt_chat_requests(engine, requests_):
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    reqs = [GenRequest(question="Say hello.", seed=1), GenRequest(messages=chat, image=requests_[0].image, seed=2)]
    out = engine.generate(reqs, SamplingSpec(k=2, max_new_tokens=5))
    assert [len(o) for o in out] == [2, 2]


def test_lora_adapter_changes_the_outputs(tiny_model_dir, requests_, tmp_path):
    from peft import LoraConfig, get_peft_model

    from backend.models import load_model

    adapter = tmp_path / "adapter"
    peft_model = get_peft_model(load_model(tiny_model_dir), LoraConfig(
        r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(adapter)
    params = SamplingSpec(k=1, temperature=0.0, max_new_tokens=8, min_new_tokens=8)
    base = HFEngine(EngineSpec(str(tiny_model_dir))).generate(requests_, params)
    tuned = HFEngine(EngineSpec(str(tiny_model_dir), adapter_path=str(adapter))).generate(requests_, params)
    assert texts(tuned) != texts(base)
    with pytest.raises(ModelNotAvailable, match="cannot load the LoRA adapter"):
        HFEngine(EngineSpec(str(tiny_model_dir), adapter_path=str(tmp_path / "nope")))


# ---- the vllm engine's requests (checked without vllm) --------------------------------------------

def test_vllm_sampling_params_kwargs():
    sampled = vllm_engine.build_sampling_params_kwargs(
        SamplingSpec(k=5, temperature=0.7, top_p=0.9, max_new_tokens=32), seed=11)
    assert sampled == {"n": 5, "temperature": 0.7, "top_p": 0.9, "max_tokens": 32, "seed": 11}
    greedy = vllm_engine.build_sampling_params_kwargs(SamplingSpec(k=5, temperature=0.0, max_new_tokens=8), seed=3)
    assert greedy == {"n": 1, "temperature": 0.0, "max_tokens": 8, "seed": 3}
    fixed = vllm_engine.build_sampling_params_kwargs(SamplingSpec(k=2, max_new_tokens=8, min_new_tokens=8), seed=0)
    assert fixed["min_tokens"] == 8


def test_vllm_prompts_use_the_models_chat_template(tiny_model_dir, requests_):
    from backend.models import load_processor

    processor = load_processor(tiny_model_dir)
    prompts = vllm_engine.build_vllm_requests(requests_[:1] + [GenRequest(question="Hi?")],
                                              processor.apply_chat_template)
    assert prompts[0] == {
        "prompt": "<|im_start|>user\n<image>\nWhat is in the image?<|im_end|>\n<|im_start|>assistant\n",
        "multi_modal_data": {"image": requests_[0].image},
    }
    assert prompts[1] == {"prompt": "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"}


def test_vllm_llm_and_lora_arguments(tmp_path):
    assert vllm_engine.build_lora_request_args(None) is None
    adapter = tmp_path / "c1"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8}))
    assert vllm_engine.build_lora_request_args(str(adapter)) == ("c1", 1, str(adapter.resolve()))

    full = vllm_engine.build_llm_kwargs(EngineSpec("org/model", dtype="bfloat16", tensor_parallel_size=2))
    assert full == {"model": "org/model", "tensor_parallel_size": 2, "dtype": "bfloat16", "enable_lora": False,
                    "limit_mm_per_prompt": {"image": 1}}
    lora = vllm_engine.build_llm_kwargs(EngineSpec("org/model", adapter_path=str(adapter),
                                                   extra={"gpu_memory_utilization": 0.8}))
    assert lora["enable_lora"] is True and lora["max_lora_rank"] == 16 and lora["gpu_memory_utilization"] == 0.8
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 64}))
    assert vllm_engine.build_llm_kwargs(EngineSpec("m", adapter_path=str(adapter)))["max_lora_rank"] == 64
    with pytest.raises(ModelNotAvailable, match="not a LoRA adapter folder"):
        vllm_engine.build_llm_kwargs(EngineSpec("m", adapter_path=str(tmp_path)))


def test_vllm_outputs_are_parsed():
    # vllm's RequestOutput / CompletionOutput shapes (third-party types, not our code)
    ro = SimpleNamespace(outputs=[SimpleNamespace(text=" a cat \n", token_ids=[5, 6, 2], finish_reason="stop"),
                                  SimpleNamespace(text="dog", token_ids=[7] * 32, finish_reason="length")])
    (outs,) = vllm_engine.parse_request_outputs([ro])
    assert [(o.text, o.num_tokens, o.finish_reason) for o in outs] == [("a cat", 3, "stop"), ("dog", 32, "length")]


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here")
def test_vllm_without_the_extra_says_how_to_get_it():
    with pytest.raises(ModelNotAvailable) as exc:
        make_engine("vllm", EngineSpec("org/model"))
    assert "pip install 'prefloop[gpu]'" in str(exc.value) and "CUDA" in str(exc.value)


# ---- the job ------------------------------------------------------------------------------------

def run_job(run_dir: Path) -> tuple[subprocess.CompletedProcess, list[dict]]:
    proc = subprocess.run([sys.executable, "-m", "backend.jobs.generate", str(run_dir)], cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
                          check=False)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    return proc, events


def test_job_writes_candidates_with_provenance(tiny_model_dir, tmp_path, capsys):
    run_dir = write_run(tmp_path / "run", tiny_model_dir)
    proc, events = run_job(run_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]

    # JSON lines: progress per batch up to prompts x views, load time and tokens/s logged, done last
    assert all("event" in e for e in events)
    prog = [e for e in events if e["event"] == "progress"]
    assert [p["done"] for p in prog] == [0, 2, 3, 5, 6, 8, 9] and {p["total"] for p in prog} == {9}
    logs = " ".join(e["message"] for e in events if e["event"] == "log")
    assert "loaded tiny" in logs and "tokens/s" in logs
    assert events[-1]["event"] == "done"
    summary = events[-1]["summary"]
    assert summary["candidates"] == 3 * 2 + 3 + 3 and summary["tokens"] > 0 and summary["tokens_per_s"] > 0

    out = run_dir / "candidates.parquet"
    assert not list(run_dir.glob("*.tmp"))
    table = pq.read_table(out)
    assert table.schema.equals(SCHEMA)
    rows = table.to_pylist()
    assert len(rows) == 12
    by_view: dict[str, list[dict]] = {}
    for r in rows:
        by_view.setdefault(r["view"], []).append(r)
        assert r["candidate_id"] == candidate_id(1, "c0", r["prompt_id"], r["view"], r["sample_index"])
        assert (r["round_id"], r["checkpoint_id"], r["model"], r["engine"]) == (1, "c0", "tiny", "hf")
        assert isinstance(r["text"], str) and isinstance(r["seed"], int)
    assert len({r["candidate_id"] for r in rows}) == 12

    original = by_view["original"]
    assert sorted((r["prompt_id"], r["sample_index"]) for r in original) == [
        (f"p{i}", s) for i in range(3) for s in range(2)]
    for r in original:
        assert r["origin"] == "policy" and r["augmentation"] is None
        assert json.loads(r["sampling"]) == {"temperature": 0.8, "top_p": 0.9, "max_new_tokens": 8, "k": 2,
                                             "do_sample": True}
    for spec, name, params in (("aug:diffusion:500", "diffusion", {"T": 500}), ("aug:flip", "flip", {})):
        aug = by_view[spec]
        assert sorted(r["prompt_id"] for r in aug) == ["p0", "p1", "p2"]
        for r in aug:
            assert r["origin"] == "seva_augmented" and r["sample_index"] == 0
            assert json.loads(r["augmentation"]) == {"name": name, "params": params, "seed": r["seed"]}
            assert json.loads(r["sampling"])["do_sample"] is False and json.loads(r["sampling"])["k"] == 1
    # each view's seed is derived from (seed, prompt, view): different views, different seeds
    assert len({(r["prompt_id"], r["seed"]) for r in rows}) == 9

    # same inputs and seeds in another process give the same candidates
    again = write_run(tmp_path / "again", tiny_model_dir)
    assert generate_main([str(again)]) == 0
    capsys.readouterr()
    key = lambda r: r["candidate_id"]
    assert [(r["candidate_id"], r["text"]) for r in sorted(rows, key=key)] == [
        (r["candidate_id"], r["text"]) for r in sorted(pq.read_table(again / "candidates.parquet").to_pylist(), key=key)]


def test_job_reports_a_missing_vllm_as_an_error_event(tiny_model_dir, tmp_path):
    if HAS_VLLM:
        pytest.skip("vllm is installed here")
    run_dir = write_run(tmp_path / "run", tiny_model_dir, n_prompts=1, engine="vllm")
    proc, events = run_job(run_dir)
    assert proc.returncode == 1
    assert events[-1]["event"] == "error" and "prefloop[gpu]" in events[-1]["message"]
    assert not (run_dir / "candidates.parquet").exists()


def test_job_config_errors_name_the_key(tiny_model_dir, tmp_path):
    run_dir = write_run(tmp_path / "run", tiny_model_dir, n_prompts=1)
    cfg = json.loads((run_dir / "config.json").read_text())
    del cfg["round_id"]
    cfg["temprature"] = 0.5
    (run_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as exc:
        load_job_config(run_dir, GenerateJobConfig)
    assert "round_id: Field required" in str(exc.value) and "temprature: unknown key" in str(exc.value)


def test_job_rejects_a_bad_view_and_a_missing_image_before_loading_the_model(tiny_model_dir, tmp_path):
    run_dir = write_run(tmp_path / "bad_view", tiny_model_dir, n_prompts=1, views=["original", "aug:blurry"],
                        model_path=str(tmp_path / "no-model"))
    with pytest.raises(UsageError, match="unknown augmentation 'blurry'"):
        generate_main([str(run_dir)])
    run_dir = write_run(tmp_path / "no_image", tiny_model_dir, n_prompts=2, model_path=str(tmp_path / "no-model"))
    (run_dir / "img" / "1.png").unlink()
    with pytest.raises(UsageError, match=r"prompt p1: .*1\.png"):
        generate_main([str(run_dir)])
