"""Recipes against their papers (issue 14): each recipe's [[paper]] table matches the recipe as resolved, the
README shows the tables, a deviation says why; global batch, schedule and warmup reach TRL; a recipe's round
count is the default of --rounds."""

from __future__ import annotations

import shutil

import pytest

from backend import launch, loop, recipes
from core.config import TrainConfig
from core.errors import ConfigError, UsageError
from tests.helpers import REPO

COVERED = {"generation.k", "generation.temperature", "generation.max_new_tokens", "train.beta",
           "train.learning_rate", "train.lr_scheduler", "train.warmup_ratio", "train.max_length", "policy.dtype",
           "pairs.strategy"}
"""Keys every recipe's table must cover: the values that change results most."""


@pytest.mark.parametrize("name", recipes.names())
def test_each_recipe_matches_its_paper_table(name):
    recipe = recipes.load(name)
    keys = {r.key for r in recipe.paper_rows if r.key}
    assert COVERED <= keys, f"{name}'s paper table lacks {sorted(COVERED - keys)}"
    assert recipes.paper_mismatches(recipe) == []
    deviations = [r for r in recipe.paper_rows if r.ours is not None and r.ours != r.paper]
    assert all(r.why.strip() for r in deviations)


def test_a_value_that_drifts_from_its_table_is_named(tmp_path):
    path = tmp_path / "seva.toml"
    shutil.copy(recipes.RECIPES["seva"], path)
    path.write_text(path.read_text().replace("learning_rate = 2e-6", "learning_rate = 1e-5", 1))
    problems = recipes.paper_mismatches(recipes.load_file(path))
    assert problems == ["seva: learning rate (train.learning_rate) is 1e-05, the table says 2e-06"]


def test_a_deviation_without_why_or_an_unknown_key_is_refused(tmp_path):
    path = tmp_path / "seva.toml"
    shutil.copy(recipes.RECIPES["seva"], path)
    text = path.read_text()
    path.write_text(text + '\n[[paper]]\nitem = "x"\nkey = "train.beta"\npaper = 0.1\nours = 0.2\nsource = "s"\n')
    with pytest.raises(ConfigError, match=r"\(x\): ours differs from the paper; say why"):
        recipes.load_file(path)
    path.write_text(text + '\n[[paper]]\nitem = "y"\nkey = "train.betta"\npaper = 0.1\nsource = "s"\n')
    with pytest.raises(ConfigError, match="unknown config key 'train.betta'"):
        recipes.load_file(path)


def test_readme_shows_every_paper_table():
    readme = (REPO / "README.md").read_text()
    for recipe in recipes.all_recipes():
        assert recipes.paper_table(recipe) in readme, f"README.md lacks {recipe.name}'s paper table " \
                                                      "(backend.recipes.paper_table)"


def test_global_batch_sets_grad_accum_over_all_ranks(tmp_path):
    train = TrainConfig(batch_size=8, global_batch=128, launcher="deepspeed", num_processes=4)
    assert launch.resolve_grad_accum(train, 4) == 4
    hosts = tmp_path / "hostfile"
    hosts.write_text("# two nodes\nnode1 slots=4\nnode2 slots=4\n\n")
    assert launch.resolve_grad_accum(train.model_copy(update={"hostfile": str(hosts)}), 4) == 2
    assert launch.resolve_grad_accum(TrainConfig(batch_size=2, global_batch=8), 1) == 4  # local: one rank
    assert launch.resolve_grad_accum(TrainConfig(grad_accum=3), 1) == 3
    with pytest.raises(UsageError, match=r"global_batch = 100 is not a multiple of .* = 32"):
        launch.resolve_grad_accum(train.model_copy(update={"global_batch": 100}), 4)
    resolved = launch.resolve_train(TrainConfig(batch_size=2, global_batch=8), visible=0)
    assert resolved.grad_accum == 4 and resolved.num_processes == 1


def test_schedule_and_warmup_reach_trls_config(tmp_path):
    from backend import dpo

    args = dpo.dpo_config(TrainConfig(lr_scheduler="cosine", warmup_ratio=0.1, grad_accum=4),
                          output_dir=tmp_path, device="cpu", dtype="float32")
    assert getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type) == "cosine" and args.warmup_steps == 0.1
    assert args.gradient_accumulation_steps == 4


def test_recipe_round_count_is_the_default_of_rounds(tmp_path):
    from app.cli import build_parser, main
    from storage.workspace import open_workspace

    ws = tmp_path / "ws"
    assert main(["init", str(ws), "--model", "tiny"]) == 0
    parse = build_parser().parse_args
    with open_workspace(ws, command="test") as opened:
        assert loop.plan_round(opened, parse(["round", "start", "--recipe", "ov_chat"])).rounds == 3
        assert loop.plan_round(opened, parse(["round", "start", "--recipe", "ov_chat", "--rounds", "1"])).rounds == 1
        assert loop.plan_round(opened, parse(["round", "start"])).rounds == 1


def test_readme_memory_figures_are_the_estimators():
    readme = (REPO / "README.md").read_text()
    for recipe in recipes.all_recipes():
        line = recipes.memory_line(recipe)
        assert line in readme, f"README.md's recipe table should say: {line}"
    assert "LoRA r=1024 (2.56B trainable)" in recipes.memory_line(recipes.load("seva"))
