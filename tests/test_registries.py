"""Registries, the CLI help and the README stay in sync."""

from __future__ import annotations

import importlib
import re

import pytest

from annotators import registry as judges
from app.cli import COMMANDS
from backend import dpo
from backend.pairs import STRATEGIES
from core import config as cfgmod
from core import names
from core.errors import ConfigError
from tests.helpers import REPO, run_cli

README = (REPO / "README.md").read_text()


def _readme_table_names(header: str) -> set[str]:
    """First-column names (in backticks) of the README table whose header row starts with ``header``."""
    lines = README.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {header} |"))
    names = set()
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        m = re.match(r"\|\s*`([^`]+)`", ln)
        if m:
            names.add(m.group(1))
    return names


def test_every_command_has_a_module_and_is_in_help_and_readme():
    r = run_cli("--help")
    assert r.returncode == 0
    for name, (modname, help_) in COMMANDS.items():
        mod = importlib.import_module(modname)
        assert callable(mod.add_arguments) and callable(mod.run), name
        assert name in r.stdout and help_[:30] in " ".join(r.stdout.split()), name
    assert _readme_table_names("command") == set(COMMANDS)


def test_every_command_help_runs():
    for name in COMMANDS:
        r = run_cli(name, "--help")
        assert r.returncode == 0 and "usage: prefloop" in r.stdout, (name, r.stderr)


def test_pair_strategies_match_readme():
    assert _readme_table_names("strategy") == set(STRATEGIES)


def test_config_names_match_the_implementation_registries():
    """core.names (what prefloop.toml is checked against on load) and the registries agree, in order."""
    assert list(names.PAIR_STRATEGIES) == list(STRATEGIES)
    assert list(names.LOSSES) == list(dpo.LOSSES)
    assert list(names.JUDGES) == list(judges.JUDGES)
    assert judges.DESCRIPTIONS is names.JUDGES
    for registry in (names.PAIR_STRATEGIES, names.LOSSES, names.JUDGES):
        assert all(isinstance(d, str) and d and "\n" not in d for d in registry.values())


@pytest.mark.parametrize(("section", "key", "value", "kind", "registry"), [
    ("pairs", "strategy", '"best-of-n"', "pair strategy", names.PAIR_STRATEGIES),
    ("pairs", "judge", '"gemini:v2"', "judge", names.JUDGES),
    ("train", "loss", '["sigmoid", "kto"]', "loss type", names.LOSSES),
    ("judges", "default", '["reference", "oracle"]', "judge", names.JUDGES),
    ("round", "eval_judge", '"oracle"', "judge", names.JUDGES),
])
def test_an_unknown_name_fails_when_the_config_loads(tmp_path, section, key, value, kind, registry):
    path = tmp_path / cfgmod.CONFIG_NAME
    path.write_text(f"[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as err:
        cfgmod.load(path)
    bad = re.findall(r'"([^"]+)"', value)[-1]
    assert str(err.value).startswith(f"{path}: {section}.{key}: unknown {kind} {bad!r}; "
                                     f"choose one of: {', '.join(registry)} (got ")
