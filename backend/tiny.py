"""The built-in ``tiny`` model: a randomly initialised LLaVA-architecture VLM, built in seconds.

A CLIP-style vision tower (32x32 pixels, 8x8 patches -> 16 image tokens) and a Qwen2-style language
model with hidden size 64, joined by LLaVA's projector, with a byte-level BPE tokenizer trained
offline on a small built-in corpus and a ChatML chat template. It uses the plain LLaVA classes:
LLaVA-OneVision and Qwen2-VL processors need torchvision, which cannot be installed beside CPU torch.
Its answers are noise; it exists for tests and smoke runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", IMAGE_TOKEN]

# Qwen-style ChatML; content may be a string or a list of {"type": "image"|"text"} parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
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

_CORPUS = """
The image shows a cat sitting on a red chair next to a window. There are three apples on the table.
What color is the car? The car is blue. How many people are in the picture? Two people are standing.
Describe the scene in detail. A small boat floats on a calm lake under a clear sky with white clouds.
Is there a dog in the image? No, there is no dog. The sign reads "open". The clock shows ten past two.
A rocket is launching from the pad, leaving a trail of smoke. An astronaut in a white suit smiles.
The coffee cup is on a saucer. Coins of different sizes are spread on a dark surface. A horse runs.
yes no red green blue yellow black white gray circle square triangle rectangle shape color
one two three four five six seven eight nine ten left right top bottom small large big
"""


def train_tokenizer(special_tokens: list[str], *, eos: str, pad: str, chat_template: str,
                    bos: str | None = None, extra_special_tokens: dict[str, str] | None = None):
    """A byte-level BPE tokenizer trained offline on the built-in corpus (600 tokens), with
    ``special_tokens`` first in the vocabulary, left padding and ``chat_template``. Shared by every tiny
    build (``backend.tiny_families`` too)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=special_tokens, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
        unk_token=None, extra_special_tokens=extra_special_tokens or {},
    )
    fast.padding_side = "left"
    fast.chat_template = chat_template
    return fast


def build_tokenizer():
    return train_tokenizer(SPECIAL_TOKENS, eos="<|im_end|>", pad="<pad>", chat_template=CHAT_TEMPLATE,
                           extra_special_tokens={"image_token": IMAGE_TOKEN})


def build_processor():
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=8,
        vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1, image_token=IMAGE_TOKEN,
    )


def build_model(tokenizer, seed: int = 0):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=32,
    )
    text = Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048,
        tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default", vision_feature_layer=-2, projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    quiet_generation(model, tokenizer, SPECIAL_TOKENS)
    return model


def quiet_generation(model, tokenizer, special_tokens: list[str]) -> None:
    """Set eos/pad in the generation config and suppress special and blank tokens: a random model
    otherwise often emits only special or whitespace tokens (empty answers once decoded, which would
    make every greedy SeVa view answer equal)."""
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    suppress = [tokenizer.convert_tokens_to_ids(t) for t in special_tokens if t != tokenizer.eos_token]
    suppress += [i for i in range(len(tokenizer)) if i not in suppress and i != tokenizer.eos_token_id
                 and not tokenizer.decode([i]).strip()]
    model.generation_config.suppress_tokens = suppress


def save_build(out_dir: str | Path, name: str, seed: int, model, processor) -> Path:
    """Save a tiny build's model + processor to ``out_dir`` with its ``prefloop_model.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "prefloop_model.json").write_text(json.dumps({"name": name, "seed": seed}))
    return out


def build_tiny(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny VLM and save model + processor to ``out_dir`` (loadable with from_pretrained)."""
    processor = build_processor()
    return save_build(out_dir, "tiny", seed, build_model(processor.tokenizer, seed=seed), processor)
