"""The ``vllm`` engine (GPU extra): ``SamplingParams(n=k, ...)`` per request, LoRA via ``LoRARequest``.

A step's requests (every view) go to ONE ``LLM.generate`` call: vLLM schedules its own batches. Each
prompt is the model's own chat template rendered by its processor (loaded alone, never the weights),
with one unexpanded image placeholder per image (vLLM expands it); the placeholder is checked against
the family table (``backend.families``). vllm is imported only when the engine is built, never at module
import. Everything the engine sends to vllm is built by the pure functions below, so tests check it
without vllm installed. Status: not yet run on a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from backend.engines.base import (
    EngineSpec,
    GenOutput,
    GenRequest,
    Group,
    SamplingSpec,
    build_messages,
    request_seed,
)
from core.errors import ModelNotAvailable, UsageError

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "the vllm engine needs the `gpu` extra: pip install 'prefloop[gpu]' on a machine with CUDA "
    "(vllm needs a CUDA build of torch); or set policy.engine = \"hf\" in prefloop.toml"
)
LORA_ID = 1


def build_sampling_params_kwargs(params: SamplingSpec, seed: int) -> dict:
    """Keyword arguments for ``vllm.SamplingParams`` of one request."""
    kwargs = {"n": params.n, "temperature": params.temperature, "max_tokens": params.max_new_tokens,
              "seed": seed}
    if params.do_sample:
        kwargs["top_p"] = params.top_p
    if params.min_new_tokens:
        kwargs["min_tokens"] = params.min_new_tokens
    return kwargs


def build_vllm_requests(requests: list[GenRequest], apply_chat_template) -> list[dict]:
    """vllm prompt dicts: ``{"prompt": chat text, "multi_modal_data": {"image": PIL}}`` per request.

    ``apply_chat_template(messages, add_generation_prompt=True) -> str`` is the processor's (or
    tokenizer's) chat template, so the image placeholder is the one the model expects.
    """
    prompts = []
    for r in requests:
        prompt = {"prompt": apply_chat_template(build_messages(r), add_generation_prompt=True)}
        if r.image is not None:
            prompt["multi_modal_data"] = {"image": r.image}
        prompts.append(prompt)
    return prompts


def count_images(messages: list[dict]) -> int:
    """Image parts in a chat (``{"type": "image"}`` items of list contents)."""
    return sum(1 for m in messages if isinstance(m.get("content"), list)
               for part in m["content"] if isinstance(part, dict) and part.get("type") == "image")


def check_placeholders(prompts: list[dict], requests: list[GenRequest], placeholder: str, family: str) -> None:
    """Each prompt holds the family's vLLM image placeholder once per image of its chat (vLLM expands it;
    a different or missing placeholder would reach the model as plain text)."""
    for prompt, request in zip(prompts, requests):
        want, found = count_images(build_messages(request)), prompt["prompt"].count(placeholder)
        if found != want:
            raise UsageError(
                f"request {request.request_id or '?'}: the chat template of this {family} model wrote the image "
                f"placeholder {placeholder!r} {found} time(s) for {want} image(s); vLLM needs it once per image. "
                f"Check the model's chat_template, or the family's vllm_placeholder in backend/families.py")


def build_step(groups: list[Group], apply_chat_template, placeholder: tuple[str, str] | None = None):
    """One ``LLM.generate`` call for a whole step: the prompt dicts of every group, in order, and the
    ``SamplingParams`` keyword arguments of each (the group's sampling, the request's seed).
    ``placeholder`` is (family vllm_placeholder, family title) to check, or None (family unknown)."""
    prompts, sampling = [], []
    for requests, params in groups:
        group_prompts = build_vllm_requests(requests, apply_chat_template)
        if placeholder is not None:
            check_placeholders(group_prompts, requests, *placeholder)
        prompts.extend(group_prompts)
        sampling.extend(build_sampling_params_kwargs(params, request_seed(r, params, i))
                        for i, r in enumerate(requests))
    return prompts, sampling


def split_outputs(outputs: list, groups: list[Group]) -> list[list]:
    """The outputs of one call cut back into the groups' sizes."""
    if len(outputs) != sum(len(requests) for requests, _ in groups):
        raise RuntimeError(f"vllm returned {len(outputs)} outputs for "
                           f"{sum(len(r) for r, _ in groups)} prompts")
    result, start = [], 0
    for requests, _ in groups:
        result.append(outputs[start:start + len(requests)])
        start += len(requests)
    return result


def build_lora_request_args(adapter_path: str | None) -> tuple[str, int, str] | None:
    """``LoRARequest(name, id, path)`` arguments for an adapter checkpoint, or None for full weights."""
    if not adapter_path:
        return None
    path = Path(adapter_path).resolve()
    return (path.name or "adapter", LORA_ID, str(path))


def build_llm_kwargs(spec: EngineSpec) -> dict:
    """Keyword arguments for ``vllm.LLM``."""
    kwargs = {"model": spec.model_path, "tensor_parallel_size": spec.tensor_parallel_size,
              "dtype": spec.dtype, "enable_lora": bool(spec.adapter_path), "limit_mm_per_prompt": {"image": 1}}
    if spec.adapter_path:
        kwargs["max_lora_rank"] = _adapter_rank(spec.adapter_path)
    if spec.image_processor:
        kwargs["mm_processor_kwargs"] = dict(spec.image_processor)
    kwargs.update(spec.extra)
    return kwargs


def parse_request_outputs(request_outputs) -> list[list[GenOutput]]:
    """vllm ``RequestOutput``s -> our outputs (text stripped, token count, finish reason)."""
    return [[GenOutput(text=c.text.strip(), num_tokens=len(c.token_ids), finish_reason=str(c.finish_reason))
             for c in ro.outputs] for ro in request_outputs]


def _adapter_rank(adapter_path: str) -> int:
    cfg = Path(adapter_path) / "adapter_config.json"
    try:
        r = int(json.loads(cfg.read_text()).get("r", 16))
    except (OSError, ValueError) as err:
        raise ModelNotAvailable(f"{adapter_path} is not a LoRA adapter folder (cannot read {cfg.name}: {err})") from None
    return max(16, 1 << (r - 1).bit_length())  # vllm accepts powers of two >= 8; 16 is its default


def require_vllm():
    if importlib.util.find_spec("vllm") is None:
        raise ModelNotAvailable(INSTALL_HINT)
    import vllm

    return vllm


class VLLMEngine:
    name = "vllm"
    requests_per_call = None  # the whole step: vLLM schedules its own batches

    def __init__(self, spec: EngineSpec):
        vllm = require_vllm()
        from backend.models import load_processor

        self.spec = spec
        self._vllm = vllm
        self.processor = load_processor(spec.model_path, image_processor=spec.image_processor)
        self.placeholder = _family_placeholder(spec.model_path)
        self.llm = vllm.LLM(**build_llm_kwargs(spec))
        args = build_lora_request_args(spec.adapter_path)
        if args:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest(*args)
        else:
            self.lora = None

    def generate(self, requests: list[GenRequest], params: SamplingSpec) -> list[list[GenOutput]]:
        return self.generate_many([(requests, params)])[0]

    def generate_many(self, groups: list[Group]) -> list[list[list[GenOutput]]]:
        prompts, kwargs = build_step(groups, self.processor.apply_chat_template, self.placeholder)
        if not prompts:
            return [[] for _ in groups]
        sampling = [self._vllm.SamplingParams(**kw) for kw in kwargs]
        outs = self.llm.generate(prompts, sampling_params=sampling, lora_request=self.lora, use_tqdm=False)
        return split_outputs(parse_request_outputs(outs), groups)

    def close(self) -> None:
        self.llm = None


def _family_placeholder(model_path: str) -> tuple[str, str] | None:
    """(vllm_placeholder, title) of the model's family; None when the family is unknown here (a hub id
    not in the local cache, a model_type outside the table): the prompts are then sent unchecked."""
    from backend.families import family_of

    try:
        family = family_of(model_path)
    except UsageError as err:
        log.warning("not checking the vLLM image placeholder: %s", err)
        return None
    return family.vllm_placeholder, family.title
