"""Generation engines: a registry name -> factory taking an :class:`EngineSpec`.

``hf`` runs anywhere (transformers ``generate``); ``vllm`` is the GPU extra and is imported lazily.
"""

from __future__ import annotations

from backend.engines.base import (
    Engine,
    EngineSpec,
    GenOutput,
    GenRequest,
    SamplingSpec,
    build_messages,
    derive_seed,
)
from backend.engines.hf import HFEngine
from backend.engines.vllm import VLLMEngine
from core.errors import UsageError

ENGINES = {"hf": HFEngine, "vllm": VLLMEngine}


def make_engine(name: str, spec: EngineSpec) -> Engine:
    try:
        factory = ENGINES[name]
    except KeyError:
        raise UsageError(f"unknown generation engine {name!r}; choose one of: {', '.join(ENGINES)}") from None
    return factory(spec)


__all__ = ["ENGINES", "Engine", "EngineSpec", "GenOutput", "GenRequest", "HFEngine", "SamplingSpec",
           "VLLMEngine", "build_messages", "derive_seed", "make_engine"]
