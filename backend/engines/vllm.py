"""The ``vllm`` engine (GPU extra): ``SamplingParams(n=k, ...)`` per request, LoRA via ``LoRARequest``.

A call's requests (every view of up to ``backend.jobs.shards.UNBATCHED_CALL`` = 1024 prompts: one shard of
a resumable generate job) go to ONE ``LLM.generate`` call: vLLM schedules its own batches. Each
prompt is the model's own chat template rendered by its processor (loaded alone, never the weights),
with one unexpanded image placeholder per image (vLLM expands it); the placeholder is checked against
the family table (``backend.families``). vllm is imported only when the engine is built, never at module
import. Everything the engine sends to vllm is built by the pure functions below, so tests check it
without vllm installed. Status: not yet run on a GPU.

Parallelism: ``tensor_parallel_size`` goes to ``vllm.LLM`` (one engine splits the model over that many
GPUs). ``data_parallel_size`` is NOT an ``LLM(...)`` keyword here: vLLM's ``LLM`` refuses
``data_parallel_size > 1`` in one process (vllm/entrypoints/llm.py; examples/offline_inference/
data_parallel.py runs one process per rank). So with ``data_parallel_size = N`` the engine starts N
processes (``DataParallelRanks``), each one ``LLM`` on its own ``tensor_parallel_size`` GPUs
(``rank_devices``), and a call's prompts are cut into N contiguous shares (``shard_bounds``). For the
dense models here the ranks need no coordination (vLLM's DP coordinator matters for MoE expert layers);
per-request seeds make the answers independent of the split.
"""

from __future__ import annotations

import atexit
import importlib.util
import itertools
import json
import logging
import multiprocessing
import os
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
    """Keyword arguments for ``vllm.LLM`` (of each data-parallel rank: ``data_parallel_size`` is not one)."""
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


def _lora_request(spec: EngineSpec):
    args = build_lora_request_args(spec.adapter_path)
    if not args:
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest(*args)


# ---- data parallel: one process per rank ----------------------------------------------------------------

def visible_gpu_ids() -> list[str]:
    """The CUDA devices this process may use: ``CUDA_VISIBLE_DEVICES`` when set, else every GPU torch sees."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return [d.strip() for d in cvd.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def rank_devices(visible: list[str], tensor_parallel_size: int, data_parallel_size: int) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` of each data-parallel rank: consecutive blocks of ``tensor_parallel_size`` of
    the ``visible`` devices; a UsageError naming the settings when there are too few."""
    need = tensor_parallel_size * data_parallel_size
    if len(visible) < need:
        raise UsageError(f"policy.data_parallel_size = {data_parallel_size} x policy.tensor_parallel_size = "
                         f"{tensor_parallel_size} needs {need} GPUs and this machine sees {len(visible)}: "
                         "lower one of them")
    return [",".join(visible[r * tensor_parallel_size:(r + 1) * tensor_parallel_size])
            for r in range(data_parallel_size)]


def shard_bounds(n: int, ranks: int) -> list[tuple[int, int]]:
    """[start, end) of each rank's contiguous share of ``n`` prompts; the first ``n % ranks`` get one more."""
    floor, extra = divmod(n, ranks)
    starts = [r * floor + min(r, extra) for r in range(ranks + 1)]
    return list(itertools.pairwise(starts))


def _rank_main(spec: EngineSpec, devices: str, conn) -> None:
    """One data-parallel rank (a spawned process): its own ``LLM`` on ``devices``, answering (prompts,
    SamplingParams keywords) from ``conn`` with ("ok", outputs), until it gets None or the pipe closes; a
    failure is sent as ("error", message)."""
    os.dup2(2, 1)  # the job's stdout is the owner's protocol: vLLM's own output goes to stderr
    os.environ["CUDA_VISIBLE_DEVICES"] = devices
    try:
        vllm = require_vllm()
        llm, lora = vllm.LLM(**build_llm_kwargs(spec)), _lora_request(spec)
        while (work := conn.recv()) is not None:
            prompts, kwargs = work
            outs = llm.generate(prompts, sampling_params=[vllm.SamplingParams(**kw) for kw in kwargs],
                                lora_request=lora, use_tqdm=False)
            conn.send(("ok", parse_request_outputs(outs)))
    except EOFError:
        return
    except Exception as err:  # noqa: BLE001 - reported to the job, which fails with it
        conn.send(("error", f"{type(err).__name__}: {err}"))


class DataParallelRanks:
    """``spec.data_parallel_size`` vLLM engines in spawned processes (CUDA cannot be re-initialised in a forked
    child), each on its own GPUs; ``generate`` sends each rank its share of the prompts and joins the answers
    in the prompts' order."""

    def __init__(self, spec: EngineSpec):
        ctx = multiprocessing.get_context("spawn")
        self.conns, self.procs = [], []
        for rank, devices in enumerate(rank_devices(visible_gpu_ids(), spec.tensor_parallel_size,
                                                    spec.data_parallel_size)):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_rank_main, args=(spec, devices, theirs), name=f"vllm-dp{rank}")
            proc.start()
            theirs.close()
            self.conns.append(ours)
            self.procs.append(proc)
            log.info("vLLM data-parallel rank %d on CUDA devices %s (pid %d)", rank, devices, proc.pid)
        atexit.register(self.close)  # before multiprocessing's own exit hook, which joins the ranks

    def generate(self, prompts: list[dict], kwargs: list[dict]) -> list[list[GenOutput]]:
        busy = [(rank, a, b) for rank, (a, b) in enumerate(shard_bounds(len(prompts), len(self.conns))) if b > a]
        for rank, a, b in busy:
            try:
                self.conns[rank].send((prompts[a:b], kwargs[a:b]))
            except OSError:  # the rank has exited: its error (or EOF) is read below
                pass
        outputs: list[list[GenOutput]] = []
        for rank, _, _ in busy:
            try:
                status, reply = self.conns[rank].recv()
            except EOFError:
                raise RuntimeError(f"vLLM data-parallel rank {rank} stopped (exit code "
                                   f"{self.procs[rank].exitcode}); its error is in the job's stderr") from None
            if status == "error":
                raise RuntimeError(f"vLLM data-parallel rank {rank} failed: {reply}")
            outputs.extend(reply)
        return outputs

    def close(self, timeout_s: float = 30.0) -> None:
        atexit.unregister(self.close)
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
            conn.close()
        for proc in self.procs:
            proc.join(timeout_s)
            if proc.is_alive():
                proc.terminate()
        self.conns, self.procs = [], []


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
        self.ranks = DataParallelRanks(spec) if spec.data_parallel_size > 1 else None
        self.llm = vllm.LLM(**build_llm_kwargs(spec)) if self.ranks is None else None
        self.lora = _lora_request(spec) if self.ranks is None else None  # each rank builds its own

    def generate(self, requests: list[GenRequest], params: SamplingSpec) -> list[list[GenOutput]]:
        return self.generate_many([(requests, params)])[0]

    def generate_many(self, groups: list[Group]) -> list[list[list[GenOutput]]]:
        prompts, kwargs = build_step(groups, self.processor.apply_chat_template, self.placeholder)
        if not prompts:
            return [[] for _ in groups]
        if self.ranks is not None:
            return split_outputs(self.ranks.generate(prompts, kwargs), groups)
        sampling = [self._vllm.SamplingParams(**kw) for kw in kwargs]
        outs = self.llm.generate(prompts, sampling_params=sampling, lora_request=self.lora, use_tqdm=False)
        return split_outputs(parse_request_outputs(outs), groups)

    def close(self) -> None:
        self.llm = None
        if self.ranks is not None:
            self.ranks.close()


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
