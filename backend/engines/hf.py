"""The ``hf`` engine: transformers ``generate`` with ``num_return_sequences=k``, batched over prompts.

Prompts go through the model's processor and chat template, left padded. Each batch is seeded with
``torch.manual_seed`` from its requests' seeds, so the same prompts, seeds and batch size give the
same outputs (outputs also depend on how prompts are grouped into batches).
"""

from __future__ import annotations

import logging

import torch

from backend.engines.base import (
    EngineSpec,
    GenOutput,
    GenRequest,
    Group,
    SamplingSpec,
    batches,
    build_messages,
    derive_seed,
    request_seed,
)
from core.errors import ModelNotAvailable

log = logging.getLogger(__name__)


class HFEngine:
    name = "hf"

    def __init__(self, spec: EngineSpec, model=None, processor=None):
        """Load ``spec.model_path`` (plus ``spec.adapter_path``), or use an already loaded model/processor."""
        from backend.models import load_model, load_processor

        self.spec = spec
        self.batch_size = spec.batch_size
        self.requests_per_call = spec.batch_size
        self.processor = processor if processor is not None else load_processor(spec.model_path, image_processor=spec.image_processor)
        self.model = model if model is not None else load_model(spec.model_path, spec.dtype, spec.device)
        if spec.adapter_path and model is None:
            self.model = _load_adapter(self.model, spec.adapter_path)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)

    def generate(self, requests: list[GenRequest], params: SamplingSpec) -> list[list[GenOutput]]:
        results: list[list[GenOutput]] = []
        for start, chunk in zip(range(0, len(requests), self.batch_size), batches(requests, self.batch_size)):
            seeds = [request_seed(r, params, start + i) for i, r in enumerate(chunk)]
            results.extend(self._generate_batch(chunk, params, derive_seed("batch", *seeds)))
        return results

    def generate_many(self, groups: list[Group]) -> list[list[list[GenOutput]]]:
        return [self.generate(requests, params) for requests, params in groups]

    def _generate_batch(self, chunk: list[GenRequest], params: SamplingSpec, seed: int) -> list[list[GenOutput]]:
        texts = [self.processor.apply_chat_template(build_messages(r), add_generation_prompt=True) for r in chunk]
        images = [r.image for r in chunk if r.image is not None]
        enc = self.processor(images=images or None, text=texts, return_tensors="pt", padding=True)
        enc = enc.to(self.model.device)
        kwargs = {"max_new_tokens": params.max_new_tokens, "min_new_tokens": params.min_new_tokens or None,
                  "do_sample": params.do_sample, "num_return_sequences": params.n, "pad_token_id": self.pad_id}
        if params.do_sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(**enc, **kwargs)
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        outputs = [self._decode(row) for row in new]
        return [outputs[i * params.n:(i + 1) * params.n] for i in range(len(chunk))]

    def _decode(self, row: list[int]) -> GenOutput:
        stop = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
        ids = row if stop is None else row[:stop + 1]
        text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return GenOutput(text=text, num_tokens=len(ids), finish_reason="length" if stop is None else "stop")

    def close(self) -> None:
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _load_adapter(model, adapter_path: str):
    try:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, adapter_path).eval()
    except (OSError, ValueError) as err:
        raise ModelNotAvailable(f"cannot load the LoRA adapter {adapter_path}: {err}") from None
