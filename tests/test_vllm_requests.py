"""The vllm engine's requests per model family, checked through a fake of the remote `vllm` library
(recording what it is sent): one ``LLM.generate`` call per step, each prompt the HF processor's own
rendering of the conversation with one family placeholder per image, per-request sampling, and the
outputs mapped back to their prompts."""

from __future__ import annotations

import dataclasses
import json
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType, SimpleNamespace
from typing import ClassVar

import pytest
from PIL import Image

from backend import families
from backend.engines import EngineSpec, GenRequest, SamplingSpec, build_messages, make_engine
from backend.models import load_processor
from core.errors import UsageError

FAMILY_NAMES = ["tiny", "tiny-llava-onevision", "tiny-qwen2-vl", "tiny-idefics3"]
QUESTIONS = ["What is this?", "What color is it?", "Describe the scene.", "Is it day?", "Count the shapes."]


class FakeLLM:
    """vllm.LLM: records its arguments and each generate call; answers "<prompt index>/<sample>"."""

    calls: ClassVar[list[dict]] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def generate(self, prompts, sampling_params=None, lora_request=None, use_tqdm=True):
        FakeLLM.calls.append({"prompts": prompts, "sampling_params": sampling_params, "lora_request": lora_request})
        return [SimpleNamespace(outputs=[SimpleNamespace(text=f" {i}/{j} ", token_ids=[1] * (j + 1),
                                                         finish_reason="stop") for j in range(sp.n)])
                for i, sp in enumerate(sampling_params)]


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = ModuleType("vllm")
    vllm.LLM = FakeLLM
    vllm.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    lora = ModuleType("vllm.lora")
    lora_request = ModuleType("vllm.lora.request")
    lora_request.LoRARequest = lambda name, id_, path: SimpleNamespace(name=name, id=id_, path=path)
    for name, module in {"vllm": vllm, "vllm.lora": lora, "vllm.lora.request": lora_request}.items():
        module.__spec__ = ModuleSpec(name, None)  # importlib.util.find_spec reads it from sys.modules
        monkeypatch.setitem(sys.modules, name, module)
    FakeLLM.calls = []
    return vllm


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

    assert len(FakeLLM.calls) == 1, "one LLM.generate call for the whole step"
    (call,) = FakeLLM.calls
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
    assert FakeLLM.calls[0]["lora_request"].path == str(adapter.resolve())
    monkeypatch.setitem(families.FAMILIES, "qwen2_vl",
                        dataclasses.replace(families.FAMILIES["qwen2_vl"], vllm_placeholder="<image>"))
    with pytest.raises(UsageError, match="placeholder '<image>' 0 time"):
        make_engine("vllm", EngineSpec(model_path=str(folder))).generate(
            [GenRequest(question="Hi?", image=images[0])], SamplingSpec(k=2))
