"""The generation engine interface: requests in, k outputs per request out.

An engine is anything with ``generate(requests, params) -> list[list[GenOutput]]`` (same length and
order as ``requests``; each inner list holds ``params.n`` outputs) and ``close()``. Engines are built
from an :class:`EngineSpec` through the ``ENGINES`` registry in ``backend.engines``. The sampling of a
call comes from the workspace's ``GenerationConfig`` (:meth:`SamplingSpec.of`), or is greedy
(SeVa's augmented views, the critic).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from core.config import GenerationConfig

SEED_MAX = 2**31 - 1  # fits every seed API, and JSON readers that use doubles (JavaScript)


def derive_seed(*parts: Any) -> int:
    """A stable 31-bit seed from any parts (same parts -> same seed, on every machine)."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") & SEED_MAX


@dataclass(frozen=True)
class GenRequest:
    """One prompt: an image (PIL, or None for text only) and a question, or a pre-built chat.

    ``messages`` (chat messages whose user content may hold ``{"type": "image"}`` parts) wins over
    ``question``. ``seed`` is this request's own seed (vLLM seeds each request; the hf engine seeds
    each batch from its requests' seeds); None means one derived from the sampling seed.
    """

    question: str | None = None
    image: Any = None
    messages: list[dict] | None = None
    seed: int | None = None
    request_id: str = ""


@dataclass(frozen=True)
class GenOutput:
    """One generated answer."""

    text: str
    num_tokens: int
    finish_reason: str  # "stop" (end-of-sequence) or "length" (hit max_new_tokens)


@dataclass(frozen=True)
class SamplingSpec:
    """How one ``generate`` call samples. ``temperature == 0`` means greedy, which gives one output per request.

    The engine-level view of ``core.config.GenerationConfig`` (build it with :meth:`of`): the engines
    also sample greedily with another cap (SeVa views, the critic's ``max_new_tokens``) and can force a
    length (``min_new_tokens``, for benchmarks), which the workspace config has no business holding.
    """

    k: int = 1
    """Samples per request (one when greedy)."""
    temperature: float = 0.7
    """Sampling temperature; 0 is greedy."""
    top_p: float = 0.9
    """Nucleus sampling threshold (ignored when greedy)."""
    max_new_tokens: int = 64
    """Cap on each answer's tokens."""
    seed: int = 0
    """Seed for requests without their own."""
    min_new_tokens: int = 0
    """Force at least this many tokens (benchmarks: equal lengths across engines)."""

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k must be at least 1 (got {self.k})")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        if self.max_new_tokens < 1 or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"need 0 <= min_new_tokens <= max_new_tokens and max_new_tokens >= 1 "
                             f"(got {self.min_new_tokens}, {self.max_new_tokens})")

    @classmethod
    def of(cls, generation: GenerationConfig) -> SamplingSpec:
        """The policy's sampling from the workspace's ``[generation]`` section."""
        return cls(k=generation.k, temperature=generation.temperature, top_p=generation.top_p,
                   max_new_tokens=generation.max_new_tokens, seed=generation.seed)

    def as_greedy(self) -> SamplingSpec:
        """The same caps and seed, one greedy answer per request (SeVa's augmented views)."""
        return replace(self, k=1, temperature=0.0)

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    @property
    def n(self) -> int:
        """Outputs per request: k when sampling; 1 when greedy (k greedy answers would be identical)."""
        return self.k if self.do_sample else 1

    def record(self) -> dict:
        """The JSON-able record stored with each candidate."""
        return {"temperature": self.temperature, "top_p": self.top_p, "max_new_tokens": self.max_new_tokens,
                "k": self.n, "do_sample": self.do_sample}


@dataclass(frozen=True)
class EngineSpec:
    """What an engine loads: the model folder (or hub id) and where/how to run it."""

    model_path: str
    dtype: str = "float32"
    device: str = "cpu"
    batch_size: int = 8
    tensor_parallel_size: int = 1
    """vllm: GPUs per engine (``LLM(tensor_parallel_size=...)``)."""
    data_parallel_size: int = 1
    """vllm: engines, each in its own process on its own ``tensor_parallel_size`` GPUs, sharing each call's prompts."""
    adapter_path: str | None = None
    """A LoRA adapter folder on top of ``model_path`` (None: the weights are merged/full)."""
    image_processor: dict = field(default_factory=dict)
    """Image-processor settings that cap an image's tokens (policy.image_processor; vLLM: mm_processor_kwargs)."""
    extra: dict = field(default_factory=dict)
    """Engine-specific options (vllm: more ``LLM(...)`` keywords, e.g. gpu_memory_utilization)."""


Group = tuple[list[GenRequest], SamplingSpec]
"""Requests that share one sampling (a view of the generate step)."""


class Engine(Protocol):
    name: str
    requests_per_call: int | None
    """How many requests a caller should hand over per call: the hf engine's batch size, or None (vllm:
    the whole step at once, vLLM schedules its own batches)."""

    def generate(self, requests: list[GenRequest], params: SamplingSpec) -> list[list[GenOutput]]:
        """k outputs (``params.n``) for each request, same order as ``requests``."""
        ...

    def generate_many(self, groups: list[Group]) -> list[list[list[GenOutput]]]:
        """``generate`` of each group (each with its own sampling), in order: vllm runs them in one call."""
        ...

    def close(self) -> None:
        """Free the model (GPU memory) once the job is done."""
        ...


def request_seed(request: GenRequest, params: SamplingSpec, index: int) -> int:
    return request.seed if request.seed is not None else derive_seed(params.seed, index)


def build_messages(request: GenRequest) -> list[dict]:
    """The chat for a request: its own ``messages``, or one user turn with the image and question."""
    if request.messages is not None:
        return request.messages
    if request.question is None:
        raise ValueError("a GenRequest needs a question or messages")
    content: list[dict] = [{"type": "image"}] if request.image is not None else []
    content.append({"type": "text", "text": request.question})
    return [{"role": "user", "content": content}]


def batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]
