"""Config precedence (issue 13): defaults < recipe < prefloop.toml < --config file < --set, and the round keeps
where every value came from; prefloop.toml holds only what was chosen (defaults are commented lines)."""

from __future__ import annotations

import json
import tomllib

import pytest

from backend import loop
from core import config as cfgmod
from core.errors import ConfigError, UsageError
from tests.helpers import q


def test_resolve_lays_each_layer_over_the_ones_before_and_names_the_source():
    cfg, sources = cfgmod.resolve([
        ("recipe x", {"train": {"beta": 0.5, "lora": False}, "generation": {"k": 7}}),
        ("prefloop.toml", {"train": {"beta": 0.2}}),
        ("--set", {"generation": {"k": 3}}),
    ])
    assert (cfg.train.beta, cfg.train.lora, cfg.generation.k) == (0.2, False, 3)
    assert sources["train.beta"] == "prefloop.toml" and sources["train.lora"] == "recipe x"
    assert sources["generation.k"] == "--set" and sources["generation.temperature"] == "default"
    assert set(sources) == set(cfgmod.leaves(cfgmod.WorkspaceConfig().model_dump()))
    with pytest.raises(ConfigError, match="train.nope"):
        cfgmod.resolve([("--set", {"train": {"nope": 1}})])


def test_saved_file_holds_only_the_chosen_keys(tmp_path):
    cfg = cfgmod.update(cfgmod.WorkspaceConfig(), {"policy.model": "tiny-qwen2-vl", "train.beta": 0.1})
    cfgmod.save(cfg, tmp_path / "prefloop.toml")
    text = (tmp_path / "prefloop.toml").read_text()
    raw = tomllib.loads(text)
    chosen = {"policy.model": "tiny-qwen2-vl", "train.beta": 0.1}
    assert cfgmod.leaves(raw) == chosen, "defaults must stay comments"
    assert "# k = 5  # default." in text  # the default is shown, commented
    again = cfgmod.load(tmp_path / "prefloop.toml")
    assert again == cfg and cfgmod.leaves(cfgmod.explicit(again)) == chosen
    later = cfgmod.update(again, {"generation.k": 2})
    assert cfgmod.leaves(cfgmod.explicit(later)) == {**chosen, "generation.k": 2}


def test_parse_settings_reads_toml_values():
    assert loop.parse_settings(["train.beta=0.3", 'generation.views=["original"]', "policy.model=org/name"]) == {
        "train": {"beta": 0.3}, "generation": {"views": ["original"]}, "policy": {"model": "org/name"}}
    with pytest.raises(UsageError, match="KEY=VALUE"):
        loop.parse_settings(["train.beta"])


def test_round_start_resolves_recipe_toml_file_and_set(tmp_path, tiny_model_dir):
    from app.cli import build_parser
    from app.cli import main as cli_main
    from storage.workspace import open_workspace

    ws = tmp_path / "ws"
    assert cli_main(["init", str(ws), "--model", "tiny"]) == 0
    cfg = cfgmod.update(cfgmod.load(ws / "prefloop.toml"), {"train.learning_rate": 1e-4, "generation.k": 3})
    cfgmod.save(cfg, ws / "prefloop.toml")
    override = tmp_path / "over.toml"
    override.write_text("[generation]\ntemperature = 0.5\nk = 4\n")
    args = build_parser().parse_args(["round", "start", "-w", str(ws), "--recipe", "ov_chat", "--config", str(override),
                                "--set", "train.beta=0.3", "--set", "generation.k=2"])
    with open_workspace(ws, command="test") as opened:
        plan = loop.plan_round(opened, args)
        resolved = opened.config
    assert resolved.train.learning_rate == 1e-4 and plan.sources["train.learning_rate"] == "prefloop.toml"
    assert resolved.pairs.strategy == "best-worst" and plan.sources["pairs.strategy"] == "recipe ov_chat"
    assert resolved.train.lora is False and plan.sources["train.lora"] == "recipe ov_chat"
    assert resolved.generation.temperature == 0.5 and plan.sources["generation.temperature"] == f"--config {override}"
    assert resolved.generation.k == 2 and plan.sources["generation.k"] == "--set"
    assert resolved.train.beta == 0.3 and plan.sources["train.beta"] == "--set"
    assert plan.sources["train.epochs"] in ("recipe ov_chat", "default")
    assert plan.sources["generation.top_p"] in ("recipe ov_chat", "default")
    assert plan.detail["set"] == ["train.beta=0.3", "generation.k=2"]


@pytest.mark.slow
def test_the_round_saves_every_source_and_status_shows_the_chosen(tmp_path, tiny_model_dir, capsys):
    from app.cli import main as cli_main
    from tests.helpers import make_ws

    ws = make_ws(tmp_path, tiny_model_dir, **{"round.eval_judge": None, "generation.views": ["original"],
                                              "pairs.strategy": "best-worst", "pairs.judge": "reference"})
    rc = cli_main(["round", "start", "-w", str(ws), "--quiet", "--set", "train.max_steps=1"])
    assert rc == 2, "train.max_steps is not a setting: the --set layer is validated"
    assert "train.max_steps" in capsys.readouterr().err
    rc = cli_main(["round", "start", "-w", str(ws), "--quiet", "--set", "generation.k=3",
                   "--set", "generation.max_new_tokens=4"])
    (saved,), = q(ws, "SELECT config FROM rounds WHERE round_id = 1")
    saved = json.loads(saved)
    assert saved["sources"]["generation.k"] == "--set" and saved["resolved"]["generation"]["k"] == 3
    assert saved["sources"]["train.batch_size"] == "prefloop.toml"
    assert saved["sources"]["train.beta"] == "default"
    assert q(ws, "SELECT count(*) FROM candidates WHERE round_id = 1 AND origin = 'policy'")[0][0] == 3 * 5
    capsys.readouterr()
    assert cli_main(["round", "status", "-w", str(ws)]) == 0
    out = capsys.readouterr().out
    assert "generation.k = 3 (--set)" in out and "train.batch_size = 2 (prefloop.toml)" in out
