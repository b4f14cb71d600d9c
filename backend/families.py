"""What differs between vision-language model families, in one table keyed by the HF ``model_type``.

Code elsewhere reads ``FAMILIES`` (through ``family_of``) instead of branching on the architecture:
the processor class to rebuild when ``AutoProcessor`` comes back incomplete (``backend.models``), the
module names LoRA may touch and the projector ``train.train_projector`` trains (``backend.dpo``), the
image placeholder of the prompt (HF chat template and vLLM), the extra processor outputs the model's
forward needs, and the image-processor settings that cap the image's token count.

Module names are those of transformers 5.19 (``model.language_model`` / ``model.vision_tower`` ...);
``lora_target`` is matched with ``re.fullmatch`` (as peft does), the other regexes with ``re.search``
against ``named_modules()`` names (so a peft-wrapped model's prefixed names match too).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from core.errors import UsageError

_ATTN_MLP = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass(frozen=True)
class Family:
    """One model family: the facts the rest of the code needs about it."""

    model_type: str
    """The HF config's ``model_type`` (the registry key)."""
    title: str
    """Human name, for messages and the README."""
    processor_class: str
    """transformers processor class rebuilt by ``backend.models.load_processor`` when ``AutoProcessor``
    returns only the tokenizer (no torchvision); its ``video_processor`` attribute is dropped."""
    image_token: str
    """The special token the processor expands into the image's feature tokens."""
    image_placeholder: str
    """What the family's chat template writes for one image part of a user message."""
    processor_outputs: tuple[str, ...]
    """Processor outputs beyond input_ids / attention_mask / pixel_values that the model's forward needs."""
    language_model: str
    """Regex (re.search) over module names: the language model."""
    vision_tower: str
    """Regex (re.search) over module names: the vision encoder, projector excluded (LoRA never touches it)."""
    projector: tuple[str, ...]
    """Final name component(s) of the multimodal projector: peft ``modules_to_save`` (train_projector)."""
    lora_target: str
    """Default LoRA target regex (``train.lora_target = "auto"``): the language model's attention and MLP."""
    vllm_placeholder: str
    """Image placeholder in a vLLM text prompt, once per image (vLLM expands it). The vllm engine checks
    every prompt rendered by the model's chat template against it; tests/test_vllm_requests.py checks
    it against each tiny family's HF rendering. vLLM's own expansion is NOT checked here (no vLLM)."""
    resolution_keys: tuple[str, ...]
    """Image-processor settings ``policy.image_processor`` may set to cap an image's token count: only
    settings the processor alone applies (the model reads the result from the processor's outputs)."""
    resolution_note: str
    """What those settings do and their stock values."""


_QWEN2_VL = Family(
    model_type="qwen2_vl", title="Qwen2-VL",
    processor_class="Qwen2VLProcessor", image_token="<|image_pad|>",
    image_placeholder="<|vision_start|><|image_pad|><|vision_end|>",
    processor_outputs=("image_grid_thw", "mm_token_type_ids"),
    language_model=r"model\.language_model(\.|$)", vision_tower=r"model\.visual\.(?!merger)",
    projector=("merger",), lora_target=rf".*language_model.*\.{_ATTN_MLP}",
    vllm_placeholder="<|vision_start|><|image_pad|><|vision_end|>",
    resolution_keys=("min_pixels", "max_pixels"),
    resolution_note="native resolution: one token per 28x28 pixels, image resized into "
                    "[min_pixels, max_pixels] (stock 3136 .. 12845056, i.e. up to 16384 tokens)",
)
"""Qwen2-VL; Qwen2.5-VL differs only in its classes (same tokens, module names and resolution settings)."""


FAMILIES: dict[str, Family] = {
    "llava": Family(
        model_type="llava", title="LLaVA / LLaVA-1.5 (-hf); also `tiny` and `demo`",
        processor_class="LlavaProcessor", image_token="<image>", image_placeholder="<image>",
        processor_outputs=(),
        language_model=r"model\.language_model(\.|$)", vision_tower=r"model\.vision_tower(\.|$)",
        projector=("multi_modal_projector",), lora_target=rf".*language_model.*\.{_ATTN_MLP}",
        vllm_placeholder="<image>",  # "USER: <image>\n{question}\nASSISTANT:"
        resolution_keys=(),
        resolution_note="fixed: the image is resized and cropped to the tower's size (336 px: 576 tokens)",
    ),
    "llava_onevision": Family(
        model_type="llava_onevision", title="LLaVA-OneVision",
        processor_class="LlavaOnevisionProcessor", image_token="<image>", image_placeholder="<image>",
        processor_outputs=("image_sizes",),
        language_model=r"model\.language_model(\.|$)", vision_tower=r"model\.vision_tower(\.|$)",
        projector=("multi_modal_projector",), lora_target=rf".*language_model.*\.{_ATTN_MLP}",
        vllm_placeholder="<image>",  # "<|im_start|>user <image>\n{question}<|im_end|><|im_start|>assistant\n"
        resolution_keys=(),
        resolution_note="anyres: the image is tiled on the best-fitting grid of image_grid_pinpoints "
                        "(384 px tiles, up to 6x6; anyres_max_9 then pools to at most 9 tiles' worth). The "
                        "model's config holds the same grid (it unpads the features with it), so the processor "
                        "alone cannot cap it: train.max_length = auto takes the data as it is",
    ),
    "qwen2_vl": _QWEN2_VL,
    "qwen2_5_vl": replace(
        _QWEN2_VL, model_type="qwen2_5_vl", title="Qwen2.5-VL", processor_class="Qwen2_5_VLProcessor",
        resolution_note="as Qwen2-VL (its vision MLP has gate/up/down_proj too: LoRA stays in the LM)",
    ),
    "idefics3": Family(
        model_type="idefics3", title="Idefics3 / SmolVLM",
        processor_class="Idefics3Processor", image_token="<image>", image_placeholder="<image>",
        processor_outputs=("pixel_attention_mask",),
        language_model=r"model\.text_model(\.|$)", vision_tower=r"model\.vision_model(\.|$)",
        projector=("connector",), lora_target=rf".*text_model.*\.{_ATTN_MLP}",
        vllm_placeholder="<image>",  # "<|im_start|>User:<image>{question}<end_of_utterance>\nAssistant:"
        resolution_keys=("size", "max_image_size"),
        resolution_note="the image is resized to size.longest_edge and split into max_image_size tiles "
                        "(SmolVLM: 4x364 px, 364 px tiles, image_seq_len tokens per tile plus a global view)",
    ),
}
"""model_type -> Family."""


def model_type_of(config_or_folder: Any) -> str:
    """The ``model_type`` of a config object, a config dict, a model folder, or a cached hub id."""
    if hasattr(config_or_folder, "model_type"):
        return config_or_folder.model_type
    if isinstance(config_or_folder, dict):
        return str(config_or_folder.get("model_type", ""))
    path = Path(str(config_or_folder)).expanduser()
    config_file = path / "config.json" if path.is_dir() else None
    if config_file is None and str(config_or_folder).count("/") == 1:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(str(config_or_folder), "config.json")
        config_file = Path(hit) if isinstance(hit, str) else None
    if config_file is None or not config_file.is_file():
        raise UsageError(f"{config_or_folder}: no config.json to read the model family from")
    return str(json.loads(config_file.read_text(encoding="utf-8")).get("model_type", ""))


def family_of(config_or_folder: Any) -> Family:
    """The family of a model (config, config dict, folder or cached hub id); a UsageError listing the
    supported families for any other model_type."""
    model_type = model_type_of(config_or_folder)
    family = FAMILIES.get(model_type)
    if family is None:
        supported = ", ".join(f"{k} ({f.title})" for k, f in FAMILIES.items())
        raise UsageError(f"model_type {model_type!r} is not a supported model family; supported: {supported}")
    return family


def lora_target(family: Family, configured: str) -> str:
    """The LoRA target regex: the family's default for ``auto``, else the configured regex."""
    return family.lora_target if configured == "auto" else configured


def processor_class(family: Family):
    """The family's transformers processor class, minus its ``video_processor`` attribute: without
    torchvision the video processor class is a dummy and the processor refuses ``video_processor=None``.
    The subclass keeps the parent's name, so a saved ``processor_config.json`` names the real class."""
    import transformers

    cls = getattr(transformers, family.processor_class)
    if "video_processor" not in cls.get_attributes():
        return cls

    def get_attributes(klass):
        return [a for a in cls.get_attributes() if a != "video_processor"]

    members = {"get_attributes": classmethod(get_attributes), "__module__": cls.__module__}
    return type(cls.__name__, (cls,), members)


def vision_tower_modules(family: Family, model) -> list[str]:
    """Names of the model's vision-tower modules (the projector excluded)."""
    pattern = re.compile(family.vision_tower)
    return [name for name, _ in model.named_modules() if pattern.search(name)]
