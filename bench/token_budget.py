"""Longest pair per model family at the real checkpoints' image settings, for a 384x384 and a 1024x768 image.

    python bench/token_budget.py [--answer-tokens 128]

Each family's real processor class is built with the image-processor settings of the checkpoint users train
(the hub's preprocessor_config / processor_config values below) around the tiny build's tokenizer and chat
template (no hub access here): the image's tokens are exact, the text's are close (a different BPE). The
pair is measured by backend.token_budget (the pairs step's count, equal to TRL's collator). Prints the
prompt's tokens (image included) and the pair's with an answer of --answer-tokens tokens, the default
train.max_completion_length. Not a speed bench: it sizes train.max_length and GPU memory.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common  # noqa: F401  (repo on sys.path, offline env)

STOCK = {
    "llava-hf/llava-1.5-7b-hf (LLaVA)": ("tiny", "LlavaProcessor", "CLIPImageProcessorPil",
                                          {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}},
                                          {"patch_size": 14, "vision_feature_select_strategy": "default",
                                           "num_additional_image_tokens": 1}),
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": ("tiny-llava-onevision", "LlavaOnevisionProcessor",
                                                "LlavaOnevisionImageProcessorPil", {},
                                                {"num_image_tokens": 729, "vision_feature_select_strategy": "full",
                                                 "vision_aspect_ratio": "anyres_max_9"}),
    "Qwen/Qwen2-VL-7B-Instruct": ("tiny-qwen2-vl", "Qwen2VLProcessor", "Qwen2VLImageProcessorPil",
                                  {"min_pixels": 3136, "max_pixels": 12845056}, {}),
    "Qwen/Qwen2-VL-7B-Instruct, max_pixels=200704": ("tiny-qwen2-vl", "Qwen2VLProcessor",
                                                      "Qwen2VLImageProcessorPil",
                                                      {"min_pixels": 3136, "max_pixels": 200704}, {}),
    "HuggingFaceTB/SmolVLM-Instruct (Idefics3)": ("tiny-idefics3", "Idefics3Processor", "Idefics3ImageProcessorPil",
                                                  {"size": {"longest_edge": 1536},
                                                   "max_image_size": {"longest_edge": 384}},
                                                  {"image_seq_len": 81}),
}
"""label -> (tiny build giving the tokenizer + template, processor class, PIL image processor, its settings,
processor settings)."""

SIZES = [(384, 384), (1024, 768)]


def stock_processor(folder: Path, processor_cls: str, image_cls: str, image_kwargs: dict, kwargs: dict):
    import transformers

    from backend.families import family_of, processor_class
    from backend.models import load_processor

    tiny = load_processor(folder)
    module = {"LlavaProcessor": "transformers.models.clip.image_processing_pil_clip",
              "LlavaOnevisionProcessor": "transformers.models.llava_onevision.image_processing_pil_llava_onevision",
              "Qwen2VLProcessor": "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl",
              "Idefics3Processor": "transformers.models.idefics3.image_processing_pil_idefics3"}[processor_cls]
    import importlib

    images = getattr(importlib.import_module(module), image_cls)(**image_kwargs)
    cls = processor_class(family_of(folder)) if processor_cls != "LlavaProcessor" else transformers.LlavaProcessor
    return cls(image_processor=images, tokenizer=tiny.tokenizer, chat_template=tiny.chat_template, **kwargs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--answer-tokens", type=int, default=128)
    args = ap.parse_args()

    from backend.models import materialize
    from backend.token_budget import Measurer

    answer = " ".join(["word"] * args.answer_tokens * 2)
    print(f"{'checkpoint':50} {'image':>9} {'prompt':>7} {'pair':>6}   (answer capped at {args.answer_tokens})")
    with tempfile.TemporaryDirectory() as tmp:
        for label, (tiny, processor_cls, image_cls, image_kwargs, kwargs) in STOCK.items():
            folder = materialize(tiny, Path(tmp) / tiny)
            measurer = Measurer(stock_processor(folder, processor_cls, image_cls, image_kwargs, kwargs),
                                args.answer_tokens)
            for size in SIZES:
                prompt, pair = measurer.pair(size, "Describe the image in detail.", answer, "A short answer.")
                print(f"{label:50} {size[0]:>4}x{size[1]:<4} {prompt:>7} {pair:>6}")


if __name__ == "__main__":
    main()
