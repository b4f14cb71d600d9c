"""The vllm engine's requests per model family, checked through a fake of the remote `vllm` library
(tests/fakes/vllm_site, recording what it is sent): one ``LLM.generate`` call per step, each prompt the
HF processor's own rendering of the conversation with one family placeholder per image, per-request
sampling, and the outputs mapped back to their prompts; and the generate job end to end on the fake."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from backend import families, job_runner
from backend.engines import EngineSpec, GenRequest, SamplingSpec, build_messages, make_engine
from backend.models import load_processor
from core.errors import UsageError
from tests.helpers import REPO
from tests.helpers import write_generate_run as write_run

FAMILY_NAMES = ["tiny", "tiny-llava-onevision", "tiny-qwen2-vl", "tiny-idefics3"]
QUESTIONS = ["What is this?", "What color is it?", "Describe the scene.", "Is it day?", "Count the shapes."]
FAKE_VLLM_SITE = REPO / "tests" / "fakes" / "vllm_site"
"""Holds the fake `vllm` package: on sys.path in process, on PYTHONPATH for a job."""
VLLM_MODULES = ("vllm", "vllm.lora", "vllm.lora.request")


@pytest.fixture
def fake_vllm(monkeypatch):
    """The fake `vllm` (tests/fakes/vllm_site) imported in process; gone from sys.modules afterwards."""
    saved = {name: sys.modules.pop(name) for name in VLLM_MODULES if name in sys.modules}
    monkeypatch.syspath_prepend(str(FAKE_VLLM_SITE))
    vllm = importlib.import_module("vllm")
    importlib.import_module("vllm.lora.request")
    assert Path(vllm.__file__).is_relative_to(FAKE_VLLM_SITE)
    yield vllm
    for name in VLLM_MODULES:
        sys.modules.pop(name, None)
    sys.modules.update(saved)


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (64 + 16 * i, 48), (40 * i, 120, 200)) for i in range(len(QUESTIONS))]


def model_dir(name, tiny_model_dir, family_dirs):
    return tiny_model_dir if name == "tiny" else family_dirs[name]


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_one_call_per_step_with_the_familys_prompt(fake_vllm, name, tiny_model_dir, family_dirs, images):
    folder = model_dir(name, tiny_model_dir, family_dirs)
    placeholder = families.family_of(folder).vllm_placeholder
    engine = make_engine("vllm", EngineSpec(model_path=str(folder)))
    requests = [GenRequest(question=q, image=im, seed=10 + i, request_id=f"p{i}")
                for i, (q, im) in enumerate(zip(QUESTIONS, images))]
    policy = SamplingSpec(k=3, temperature=0.8, top_p=0.95, max_new_tokens=12)
    views = [GenRequest(question=r.question, image=r.image.transpose(Image.FLIP_LEFT_RIGHT), seed=50 + i,
                        request_id=r.request_id) for i, r in enumerate(requests)]
    sampled, greedy = engine.generate_many([(requests, policy), (views, policy.as_greedy())])

    assert len(fake_vllm.LLM.calls) == 1, "one LLM.generate call for the whole step"
    (call,) = fake_vllm.LLM.calls
    processor = load_processor(folder)  # the HF processor's own rendering, unexpanded
    assert len(call["prompts"]) == 10 and call["lora_request"] is None
    for prompt, request in zip(call["prompts"], requests + views):
        text = processor.apply_chat_template(build_messages(request), add_generation_prompt=True)
        assert prompt == {"prompt": text, "multi_modal_data": {"image": request.image}}
        assert text.count(placeholder) == 1
    kwargs = [vars(sp) for sp in call["sampling_params"]]
    assert kwargs[:5] == [{"n": 3, "temperature": 0.8, "top_p": 0.95, "max_tokens": 12, "seed": 10 + i}
                          for i in range(5)]
    assert kwargs[5:] == [{"n": 1, "temperature": 0.0, "max_tokens": 12, "seed": 50 + i} for i in range(5)]
    assert [[o.text for o in outs] for outs in sampled] == [[f"{i}/{j}" for j in range(3)] for i in range(5)]
    assert [[o.text for o in outs] for outs in greedy] == [[f"{i}/0"] for i in range(5, 10)]


def test_lora_and_placeholder_mismatch(fake_vllm, family_dirs, tmp_path, monkeypatch, images):
    adapter = tmp_path / "c1"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8}))
    folder = family_dirs["tiny-qwen2-vl"]
    engine = make_engine("vllm", EngineSpec(model_path=str(folder), adapter_path=str(adapter)))
    engine.generate([GenRequest(question="Hi?", image=images[0])], SamplingSpec(k=2))
    assert fake_vllm.LLM.calls[0]["lora_request"].path == str(adapter.resolve())
    monkeypatch.setitem(families.FAMILIES, "qwen2_vl",
                        dataclasses.replace(families.FAMILIES["qwen2_vl"], vllm_placeholder="<image>"))
    with pytest.raises(UsageError, match="placeholder '<image>' 0 time"):
        make_engine("vllm", EngineSpec(model_path=str(folder))).generate(
            [GenRequest(question="Hi?", image=images[0])], SamplingSpec(k=2))


def test_generate_job_on_vllm_sends_one_call_per_step(family_dirs, tmp_path):
    """The real generate job, started as the owner starts it (backend.job_runner), with engine vllm and the
    fake on its PYTHONPATH: one LLM.generate call for the step (every view's prompts), each prompt the
    family's chat template with one unexpanded image placeholder, and the fake's answers in the output."""
    name = "tiny-qwen2-vl"
    folder = family_dirs[name]
    placeholder = families.family_of(folder).vllm_placeholder
    run_dir = write_run(tmp_path / "run", folder, engine="vllm", model=name, views=["original", "aug:flip"])
    calls_file = tmp_path / "vllm_calls.jsonl"
    pythonpath = os.pathsep.join([str(FAKE_VLLM_SITE), job_runner.job_env()["PYTHONPATH"]])
    events: list[dict] = []
    result = job_runner.run_job(job_runner.python_module("backend.jobs.generate", str(run_dir)), run_dir,
                                env={"PYTHONPATH": pythonpath, "FAKE_VLLM_CALLS": str(calls_file),
                                     "HF_HUB_OFFLINE": "1"}, on_event=events.append)

    calls = [json.loads(line) for line in calls_file.read_text().splitlines()]
    assert [c["call"] for c in calls] == ["LLM", "generate"], "one LLM, one generate call for the step"
    assert calls[0]["kwargs"]["model"] == str(folder) and calls[0]["kwargs"]["enable_lora"] is False
    prompts, sampling = calls[1]["prompts"], calls[1]["sampling_params"]
    rows = pq.read_table(run_dir / "prompts.parquet").to_pylist()
    assert len(prompts) == len(sampling) == 2 * len(rows) == 6, "both views' prompts in the one call"
    processor = load_processor(folder)
    for prompt, row in zip(prompts, rows + rows):  # the original view's prompts, then the flipped ones
        with Image.open(row["image_path"]) as image:
            messages = build_messages(GenRequest(question=row["question"], image=image))
            size = list(image.size)
        assert prompt["prompt"] == processor.apply_chat_template(messages, add_generation_prompt=True)
        assert f"<|im_start|>user\n{placeholder}{row['question']}<|im_end|>" in prompt["prompt"]
        assert prompt["prompt"].count("<|image_pad|>") == 1, "unexpanded: vLLM expands the placeholder"
        assert prompt["image"] == size
    policy, greedy = (2, 0.8, 8), (1, 0.0, 8)  # k, temperature, max_new_tokens of write_run's config
    assert [(s["n"], s["temperature"], s["max_tokens"]) for s in sampling] == [policy] * 3 + [greedy] * 3

    candidates = pq.read_table(run_dir / "candidates.parquet").to_pylist()
    got = {(c["view"], c["prompt_id"], c["sample_index"]): c for c in candidates}
    index = {row["prompt_id"]: i for i, row in enumerate(rows)}
    want = {("original", pid, j): f"{i}/{j}" for pid, i in index.items() for j in range(2)}
    want |= {("aug:flip", pid, 0): f"{3 + i}/0" for pid, i in index.items()}
    assert {key: c["text"] for key, c in got.items()} == want
    assert {(c["engine"], c["model"], c["finish_reason"]) for c in candidates} == {("vllm", name, "stop")}
    assert [s["seed"] for s in sampling] == [got[(view, row["prompt_id"], 0)]["seed"]
                                             for view in ("original", "aug:flip") for row in rows]
    assert [e["done"] for e in events if e["event"] == "progress"] == [0, 6]
    assert f"loaded {name} (vllm engine)" in " ".join(e["message"] for e in events if e["event"] == "log")
    assert result.summary["candidates"] == 9 and result.summary["tokens"] == 3 * (1 + 2) + 3


# ---- parallelism ----------------------------------------------------------------------------------------

def test_tensor_and_data_parallel_settings_become_engine_arguments():
    from backend.engines import vllm as vllm_engine
    from core.config import PolicyConfig

    assert (PolicyConfig().tensor_parallel_size, PolicyConfig().data_parallel_size) == (1, 1)
    spec = EngineSpec("org/model", tensor_parallel_size=2, data_parallel_size=4)
    kwargs = vllm_engine.build_llm_kwargs(spec)
    # each rank's LLM: its tensor parallel size; never data_parallel_size (vLLM's LLM refuses > 1 in one process)
    assert kwargs["tensor_parallel_size"] == 2 and not any(k.startswith("data_parallel") for k in kwargs)
    visible = [str(i) for i in range(8)]
    assert vllm_engine.rank_devices(visible, 2, 4) == ["0,1", "2,3", "4,5", "6,7"]
    assert vllm_engine.rank_devices(["3", "5", "6"], 1, 2) == ["3", "5"]  # CUDA_VISIBLE_DEVICES's own ids
    with pytest.raises(UsageError, match=r"data_parallel_size = 4 x policy.tensor_parallel_size = 2 needs 8 GPUs "
                                         r"and this machine sees 6"):
        vllm_engine.rank_devices(visible[:6], 2, 4)
    assert vllm_engine.shard_bounds(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert vllm_engine.shard_bounds(1, 3) == [(0, 1), (1, 1), (1, 1)]


def test_data_parallel_ranks_share_a_step(fake_vllm, family_dirs, images, tmp_path, monkeypatch):
    """data_parallel_size = 2 x tensor_parallel_size = 2 on 4 (pretend) GPUs: two rank processes, each one
    LLM on its own 2 devices, each answering a contiguous half of the step, joined back in order."""
    calls_file = tmp_path / "vllm_calls.jsonl"
    monkeypatch.setenv("FAKE_VLLM_CALLS", str(calls_file))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    folder = family_dirs["tiny-qwen2-vl"]
    engine = make_engine("vllm", EngineSpec(model_path=str(folder), tensor_parallel_size=2, data_parallel_size=2))
    requests = [GenRequest(question=q, image=im, seed=10 + i) for i, (q, im) in enumerate(zip(QUESTIONS, images))]
    views = [GenRequest(question=r.question, image=r.image, seed=50 + i) for i, r in enumerate(requests)]
    policy = SamplingSpec(k=3, temperature=0.8, max_new_tokens=12)
    try:
        sampled, greedy = engine.generate_many([(requests, policy), (views, policy.as_greedy())])
    finally:
        engine.close()

    assert fake_vllm.LLM.calls == [], "no LLM in the job's own process"
    calls = [json.loads(line) for line in calls_file.read_text().splitlines()]
    llms = [c for c in calls if c["call"] == "LLM"]
    assert sorted(c["cuda_visible_devices"] for c in llms) == ["0,1", "2,3"]
    assert [c["kwargs"]["tensor_parallel_size"] for c in llms] == [2, 2]
    seeds = sorted([s["seed"] for s in c["sampling_params"]] for c in calls if c["call"] == "generate")
    assert seeds == [[10, 11, 12, 13, 14], [50, 51, 52, 53, 54]], "one contiguous half of the 10 prompts each"
    # the fake answers "<index in its call>/<sample>": rank 1's half starts again at 0, in the views' places
    assert [[o.text for o in outs] for outs in sampled] == [[f"{i}/{j}" for j in range(3)] for i in range(5)]
    assert [[o.text for o in outs] for outs in greedy] == [[f"{i}/0"] for i in range(5)]
    assert engine.ranks.procs == [], "closed: the rank processes have exited"
