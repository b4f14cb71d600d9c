"""A fake of the remote `vllm` library (GPU only), importable as ``vllm`` with ``tests/fakes/vllm_site`` on
sys.path (tests/test_vllm_requests.py's ``fake_vllm`` fixture) or on PYTHONPATH (a job subprocess).

``LLM`` records its arguments and each ``generate`` call, and answers ``"<prompt index>/<sample>"``
(padded with spaces, ``sample + 1`` token ids, finish reason ``stop``) for each of a prompt's ``n``
samples. In process the calls are in ``LLM.calls``; when the environment names a file in
``FAKE_VLLM_CALLS`` each call is also appended to it as one JSON line, for a test to read after the job:
``{"call": "LLM", "kwargs": ..., "cuda_visible_devices": the process's CUDA_VISIBLE_DEVICES}`` and ``{"call": "generate", "prompts": [{"prompt": text, "image":
[width, height] or None}], "sampling_params": [keywords], "lora_request": {name, id, path} or None}``.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import ClassVar

CALLS_ENV = "FAKE_VLLM_CALLS"


def _record(entry: dict) -> None:
    path = os.environ.get(CALLS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, default=str) + "\n")


def _image_size(prompt: dict):
    image = prompt.get("multi_modal_data", {}).get("image")
    return None if image is None else list(image.size)


class LLM:
    """vllm.LLM: records its arguments and each generate call; answers "<prompt index>/<sample>"."""

    calls: ClassVar[list[dict]] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        _record({"call": "LLM", "kwargs": kwargs, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")})

    def generate(self, prompts, sampling_params=None, lora_request=None, use_tqdm=True):
        LLM.calls.append({"prompts": prompts, "sampling_params": sampling_params,
                          "lora_request": lora_request})
        _record({"call": "generate",
                 "prompts": [{"prompt": p["prompt"], "image": _image_size(p)} for p in prompts],
                 "sampling_params": [vars(sp) for sp in sampling_params],
                 "lora_request": None if lora_request is None else vars(lora_request)})
        return [SimpleNamespace(outputs=[SimpleNamespace(text=f" {i}/{j} ", token_ids=[1] * (j + 1),
                                                         finish_reason="stop") for j in range(sp.n)])
                for i, sp in enumerate(sampling_params)]


def SamplingParams(**kwargs):
    """vllm.SamplingParams: its keywords as attributes."""
    return SimpleNamespace(**kwargs)
