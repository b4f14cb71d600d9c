"""Tiny random-weight builds of the real model families, offline, in seconds.

``tiny-llava-onevision``, ``tiny-qwen2-vl`` and ``tiny-idefics3``: each is the family's own config,
model and processor class (with its PIL image processor: no torchvision), a 600-token BPE tokenizer
trained offline on ``backend.tiny``'s corpus with the family's special tokens, and a chat template
with the real template's structure and image placeholder. Hidden size 64, 2 layers, 32 px tiles.
Their answers are noise; they exist so the whole loop runs on every family on a CPU.

The chat templates follow the real ones (llava-onevision-qwen2-*-ov-hf, Qwen2-VL-*-Instruct,
SmolVLM-Instruct) except where the real one renders an assistant turn that does not start with its own
generation prompt (OneVision writes ``<|im_start|>assistant `` then ``\\n`` + text): here the assistant
header is the generation prompt, so TRL's prompt + completion split is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from backend.families import FAMILIES, processor_class
from backend.tiny import quiet_generation, save_build, train_tokenizer

_LM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2,
           "max_position_embeddings": 2048, "tie_word_embeddings": True}

# ---- LLaVA-OneVision ----------------------------------------------------------------------------------

OV_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", "<image>", "<video>"]
OV_TEMPLATE = (  # images first, then text, as the real template
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ part['text'] }}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
OV_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def _onevision(seed: int):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tok = train_tokenizer(OV_SPECIALS, eos="<|im_end|>", pad="<pad>", chat_template=OV_TEMPLATE,
                          extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    tile = {"height": 32, "width": 32}
    images = LlavaOnevisionImageProcessorPil(size=tile, crop_size=tile, image_grid_pinpoints=OV_PINPOINTS)
    processor = processor_class(FAMILIES["llava_onevision"])(
        image_processor=images, tokenizer=tok, num_image_tokens=16, vision_feature_select_strategy="full",
        chat_template=OV_TEMPLATE, image_token="<image>", vision_aspect_ratio="anyres_max_9")
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, image_size=32, patch_size=8)
    text = Qwen2Config(**_LM, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"), vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_grid_pinpoints=OV_PINPOINTS, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(config), processor, OV_SPECIALS


# ---- Qwen2-VL -----------------------------------------------------------------------------------------

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = (  # the real one minus videos and add_vision_id
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _qwen2_vl(seed: int):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = train_tokenizer(QWEN_SPECIALS, eos="<|im_end|>", pad="<pad>", chat_template=QWEN_TEMPLATE,
                          extra_special_tokens={"image_token": "<|image_pad|>",
                                                "video_token": "<|video_pad|>",
                                                "vision_start_token": "<|vision_start|>",
                                                "vision_end_token": "<|vision_end|>"})
    # 28 px per merged token: 4 .. 16 image tokens
    images = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, patch_size=14,
                                      merge_size=2, temporal_patch_size=2)
    processor = processor_class(FAMILIES["qwen2_vl"])(image_processor=images, tokenizer=tok,
                                                      chat_template=QWEN_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    config = Qwen2VLConfig(
        text_config=dict(**_LM, vocab_size=len(tok),
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=ids["<|endoftext|>"]),
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14,
                           "spatial_merge_size": 2, "temporal_patch_size": 2, "in_chans": 3},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config), processor, QWEN_SPECIALS


# ---- Idefics3 / SmolVLM -------------------------------------------------------------------------------

IDEFICS_SPECIALS = (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", "<fake_token_around_image>",
                     "<image>", "<global-img>", "<end_of_utterance>"]
                    + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)])
IDEFICS_TEMPLATE = (  # SmolVLM-Instruct's, with string contents allowed
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _idefics3(seed: int):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tok = train_tokenizer(IDEFICS_SPECIALS, eos="<end_of_utterance>", pad="<pad>", bos="<|im_start|>",
                          chat_template=IDEFICS_TEMPLATE, extra_special_tokens={"image_token": "<image>"})
    images = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                       do_image_splitting=True)
    processor = processor_class(FAMILIES["idefics3"])(image_processor=images, tokenizer=tok, image_seq_len=4,
                                                      chat_template=IDEFICS_TEMPLATE)
    config = Idefics3Config(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2,
                           "image_size": 32, "patch_size": 8},
        text_config=dict(model_type="llama", **_LM, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    return Idefics3ForConditionalGeneration(config), processor, IDEFICS_SPECIALS


BUILDERS: dict[str, Callable[[int], tuple]] = {
    "tiny-llava-onevision": _onevision,
    "tiny-qwen2-vl": _qwen2_vl,
    "tiny-idefics3": _idefics3,
}
"""model name -> builder(seed) -> (model, processor, special tokens)."""


def build(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny model ``name`` and save model + processor to ``out_dir``."""
    model, processor, specials = BUILDERS[name](seed)
    quiet_generation(model, processor.tokenizer, specials)
    return save_build(out_dir, name, seed, model, processor)
