"""Registries, the CLI help and the README stay in sync."""

from __future__ import annotations

import importlib
import re

from app.cli import COMMANDS
from backend.pairs import STRATEGIES
from tests.conftest import REPO, run_cli

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
