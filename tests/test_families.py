"""The real model families (LLaVA-OneVision, Qwen2-VL, Idefics3) as tiny random-weight builds: the family
table, loading without torchvision, hf generation on a real photo, LoRA targets that leave the vision tower
alone (the train jobs per family, single-process and ZeRO-3, are in tests/test_family_loop.py)."""

from __future__ import annotations

import json
import re

import pytest

from backend import families, models
from backend.tiny_families import BUILDERS
from core.errors import UsageError

NAMES = list(BUILDERS)


@pytest.fixture(scope="module")
def photo():
    from app.demo_content import image

    return image("coffee")


def test_table_covers_every_builtin(family_dirs, tiny_model_dir):
    from transformers import LlavaConfig

    found = {name: families.family_of(folder).model_type for name, folder in family_dirs.items()}
    assert found == {"tiny-llava-onevision": "llava_onevision", "tiny-qwen2-vl": "qwen2_vl",
                     "tiny-idefics3": "idefics3"}
    assert families.family_of(tiny_model_dir).model_type == "llava"
    assert LlavaConfig.model_type in families.FAMILIES  # `demo` is built from LlavaConfig
    assert set(models.BUILTIN) == {"tiny", "demo", *NAMES}
    for name in NAMES:
        assert models.check_model_name(name) == "builtin"


def test_unknown_model_type_lists_the_families():
    with pytest.raises(UsageError) as err:
        families.family_of({"model_type": "mllama"})
    assert "'mllama'" in str(err.value)
    for key in families.FAMILIES:
        assert key in str(err.value)


@pytest.mark.parametrize("name", NAMES)
def test_loads_and_generates(family_dirs, photo, name):
    from backend.engines import EngineSpec, GenRequest, SamplingSpec, make_engine

    folder = family_dirs[name]
    family = families.family_of(folder)
    processor = models.load_processor(folder)
    assert type(processor).__name__ == family.processor_class
    assert processor.image_processor is not None and processor.tokenizer.padding_side == "left"
    saved = json.loads((folder / "processor_config.json").read_text())
    assert saved["processor_class"] == family.processor_class
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert family.image_placeholder in text
    enc = processor(images=[photo], text=[text], return_tensors="pt")
    assert set(family.processor_outputs) <= set(enc)

    engine = make_engine("hf", EngineSpec(model_path=str(folder)))
    outs = engine.generate([GenRequest(question="What is this?", image=photo, seed=1)],
                           SamplingSpec(k=3, max_new_tokens=6))
    engine.close()
    assert len(outs) == 1 and len(outs[0]) == 3
    assert all(o.num_tokens >= 1 for o in outs[0]) and any(o.text for o in outs[0])


@pytest.mark.parametrize("name", NAMES)
def test_lora_leaves_the_vision_tower_alone(family_dirs, name):
    from peft import get_peft_model

    from backend import dpo
    from core.config import TrainConfig

    model = models.load_model(family_dirs[name])
    family = families.family_of(model.config)
    peft_model = get_peft_model(model, dpo.lora_config(TrainConfig(lora_r=4, lora_alpha=8), model))
    wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")]
    assert wrapped and all(re.search(family.language_model, n) for n in wrapped)
    assert not [n for n in wrapped if re.search(family.vision_tower, n)]
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any(f".{family.projector[0]}." in n for n in trainable)
    assert not [n for n in trainable if re.search(family.vision_tower, n) and "lora_" not in n
                and not any(f".{p}." in n for p in family.projector)]


# ---- defaults that agree (issue 13): dtype auto, seva with a SeVa view ------------------------------------

def test_dtype_auto_resolves_to_float32_on_cpu():
    from core.config import PolicyConfig

    assert PolicyConfig().dtype == "auto"
    assert models.resolve_dtype("auto", "cpu") == "float32"
    assert models.resolve_dtype("bfloat16", "cpu") == "bfloat16"


def test_default_views_feed_the_default_strategy_and_zero_pairs_say_why():
    from backend.steps.pairs import explain
    from core.config import WorkspaceConfig

    cfg = WorkspaceConfig()
    assert cfg.pairs.strategy == "seva" and "original" in cfg.generation.views
    assert any(v.startswith("aug:") for v in cfg.generation.views)
    message = explain(0, 3, "seva", {"no_augmented_view": 3}, 1)
    assert message.startswith("round 1: 0 pairs from 3 prompts (seva)") and "generation.views" in message
    assert "prefloop generate" in explain(0, 0, "seva", {}, 1)
