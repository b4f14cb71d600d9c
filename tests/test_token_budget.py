"""The token budget (issue 13): pair lengths measured with each family's processor agree with TRL's collator;
the pairs step reports the longest pair and the pairs that would not fit; `auto` trains on every pair; a round
whose pairs all exceed train.max_length stops at the pairs step naming the setting."""

from __future__ import annotations

import pytest

from backend import dpo, models
from backend.token_budget import Measurer
from core.trl_format import trl_row
from tests.helpers import make_image, make_pairs, make_run, of, review_workspace, run_job

SIZES = [(384, 384), (1024, 768), (300, 520)]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from PIL import Image
    from skimage import data

    root = tmp_path_factory.mktemp("photos")
    out = []
    for (w, h), name in zip(SIZES, ["astronaut", "coffee", "rocket"], strict=True):
        path = root / f"{name}.png"
        Image.fromarray(getattr(data, name)()).convert("RGB").resize((w, h)).save(path)
        out.append(path)
    return out


@pytest.mark.parametrize("name", ["tiny", "tiny-llava-onevision", "tiny-qwen2-vl", "tiny-idefics3"])
def test_measured_lengths_equal_the_collators(name, family_dirs, tiny_model_dir, photos):
    from PIL import Image
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    processor = models.load_processor(tiny_model_dir if name == "tiny" else family_dirs[name])
    measurer = Measurer(processor, max_completion_length=12)
    collator = DataCollatorForVisionPreference(processor=processor, max_length=None)
    answers = ("The car is blue and there are many apples on the long table today. " * 3, "A horse.")
    seen = set()
    for path in photos:
        image = Image.open(path).convert("RGB")
        est = measurer.pair(image.size, "What is shown here, in detail?", *answers)
        chosen, cut = dpo.cap_answer(processor.tokenizer, answers[0], 12)
        assert cut
        row = {**trl_row(str(path), "What is shown here, in detail?", chosen, answers[1]), "images": [image]}
        assert est == dpo._sequence_lengths(collator, row)
        seen.add(est[0])
    if name in ("tiny-llava-onevision", "tiny-qwen2-vl"):
        assert len(seen) > 1, "the image size should change the prompt length for this family"


def test_budget_counts_the_pairs_that_do_not_fit(tiny_model_dir, tmp_path):
    processor = models.load_processor(tiny_model_dir)
    rows = make_pairs(tmp_path, 3)
    rows[1] = {**rows[1], "chosen_text": "word " * 200}
    lengths = Measurer(processor, 128).measure(rows, None).lengths
    assert lengths[1] > max(lengths[0], lengths[2])
    budget = Measurer(processor, 128).measure(rows, lengths[1] - 1)
    assert (budget.too_long, budget.fitting, budget.longest) == (1, 2, lengths[1])
    assert Measurer(processor, 128).measure(rows, None).too_long == 0


def test_auto_max_length_trains_on_a_pair_a_fixed_limit_skips(tiny_model_dir, tmp_path):
    rows = make_pairs(tmp_path, 2)
    rows[0] = {**rows[0], "chosen_text": "word " * 100}
    run_dir = make_run(tmp_path, tiny_model_dir, rows, max_steps=1, max_length="auto", max_completion_length=200)
    rc, events, stderr = run_job(run_dir)
    assert rc == 0, stderr[-2000:]
    summary = of(events, "done")[0]["summary"]
    assert summary["pairs_used"] == 2
    longest = Measurer(models.load_processor(tiny_model_dir), 200).measure(rows, None).longest
    assert longest > 100
    run_dir = make_run(tmp_path / "b", tiny_model_dir, rows, max_steps=1, max_length=longest - 1,
                       max_completion_length=200)
    rc, events, stderr = run_job(run_dir)
    assert rc == 0, stderr[-2000:]
    assert of(events, "done")[0]["summary"]["pairs_used"] == 1


def _imported(root, tiny_model_dir, changes):
    data = root / "data"
    rows = []
    for i in range(3):
        make_image(data / f"img{i}.png", size=(60 + 10 * i, 50))
        rows.append({"image": f"img{i}.png", "question": f"What is shape {i}?",
                     "chosen": "A red square on white. " * (1 + 10 * (i == 2)), "rejected": "A blue circle."})
    return review_workspace(root, tiny_model_dir, rows, changes)


def test_pairs_step_reports_the_longest_pair_and_what_will_not_fit(tmp_path, tiny_model_dir):
    from backend.steps.pairs import run_pairs

    ws = _imported(tmp_path, tiny_model_dir, {"pairs.strategy": "human-only"})
    try:
        auto = run_pairs(ws)
        assert auto["pairs"] == auto["usable"] == 3 and auto["too_long"] == 0 and auto["max_length"] == "auto"
        assert f"longest pair {auto['longest_pair']} tokens" in auto["lengths"]
        assert auto["longest_prompt"] < auto["longest_pair"]
    finally:
        ws.close()
    from core import config as cfgmod

    cfg = cfgmod.load(ws.root / "prefloop.toml")
    cfgmod.save(cfgmod.update(cfg, {"train.max_length": auto["longest_pair"] - 1}), ws.root / "prefloop.toml")
    from storage.workspace import open_workspace

    with open_workspace(ws.root, command="test") as reopened:
        capped = run_pairs(reopened)
    assert capped["pairs"] == 3 and capped["usable"] == 2 and capped["too_long"] == 1
    assert "1 of 3 pairs are longer than train.max_length" in capped["message"]
    assert 'train.max_length = "auto"' in capped["message"]


def test_a_round_whose_pairs_all_exceed_max_length_stops_at_pairs(tmp_path, tiny_model_dir, capsys):
    from app.cli import main as cli_main
    from tests.helpers import q

    ws = _imported(tmp_path, tiny_model_dir, {"pairs.strategy": "human-only", "train.max_length": 16})
    ws.close()
    rc = cli_main(["round", "start", "-w", str(ws.root)])
    out = capsys.readouterr()
    assert rc != 0
    said = out.out + out.err
    assert "3 of 3 pairs are longer than train.max_length=16" in said, said[-2000:]
    (step, status, error), = q(ws.root, "SELECT step, status, error FROM rounds WHERE round_id = 1")
    assert (step, status) == ("pairs", "failed") and "train.max_length" in error
    assert q(ws.root, "SELECT count(*) FROM checkpoints WHERE checkpoint_id = 'c1'")[0][0] == 0


def test_image_processor_caps_qwen2_vl_tokens_and_names_the_allowed_keys(family_dirs):
    from backend.engines import EngineSpec
    from backend.engines.vllm import build_llm_kwargs
    from core.errors import UsageError

    folder = family_dirs["tiny-qwen2-vl"]
    stock = Measurer(models.load_processor(folder), 16).pair((1024, 768), "What is it?", "A cat.", "A dog.")
    capped_processor = models.load_processor(folder, image_processor={"max_pixels": 64 * 64})
    capped = Measurer(capped_processor, 16).pair((1024, 768), "What is it?", "A cat.", "A dog.")
    assert capped[0] < stock[0] and capped[1] - capped[0] == stock[1] - stock[0]
    with pytest.raises(UsageError) as err:
        models.load_processor(family_dirs["tiny-llava-onevision"], image_processor={"max_pixels": 4096})
    assert "max_pixels cannot be set for LLaVA-OneVision (allowed: none)" in str(err.value)
    with pytest.raises(UsageError) as err:
        models.load_processor(folder, image_processor={"longest_edge": 4096})
    assert "allowed: min_pixels, max_pixels" in str(err.value)
    kwargs = build_llm_kwargs(EngineSpec(model_path=str(folder), image_processor={"max_pixels": 4096}))
    assert kwargs["mm_processor_kwargs"] == {"max_pixels": 4096}
    assert "mm_processor_kwargs" not in build_llm_kwargs(EngineSpec(model_path=str(folder)))
