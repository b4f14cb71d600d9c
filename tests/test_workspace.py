"""Workspace creation, config validation, migrations and the single-owner lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import duckdb
import pytest

from core import config as cfgmod
from core.errors import ConfigError, NotAWorkspace, WorkspaceInUse
from storage import migrations
from storage.workspace import init_workspace, open_workspace
from tests.helpers import REPO, run_cli


def test_migrations_from_empty_and_idempotent(tmp_path):
    con = duckdb.connect(str(tmp_path / "db.duckdb"))
    ran = migrations.migrate(con)
    assert [m.version for m in ran] == [m.version for m in migrations.MIGRATIONS]
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert {"images", "prompts", "candidates", "judgments", "labels", "pairs", "rounds", "checkpoints",
            "train_metrics", "evals", "users", "audit_log", "schema_migrations"} <= tables
    assert migrations.migrate(con) == []
    assert [v for v, _ in migrations.applied(con)] == [m.version for m in migrations.MIGRATIONS]


def test_init_creates_layout_and_valid_config(tmp_path):
    r = run_cli("init", str(tmp_path / "w"), "--model", "tiny")
    assert r.returncode == 0, r.stderr
    for name in ("prefloop.toml", "prefloop.duckdb", "images", "runs", "checkpoints"):
        assert (tmp_path / "w" / name).exists(), name
    cfg = cfgmod.load(tmp_path / "w" / "prefloop.toml")
    assert cfg.policy.model == "tiny"
    assert not (tmp_path / "w" / "owner.json").exists(), "owner info must be removed on a clean exit"


def test_status_says_which_torch_build_is_installed(tmp_path):
    import torch

    assert run_cli("init", str(tmp_path / "w"), "--model", "tiny").returncode == 0
    r = run_cli("status", "-w", str(tmp_path / "w"), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)["torch"]
    assert info["version"] == torch.__version__ and info["cuda"] == torch.version.cuda
    assert info["build"] == (f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU")
    text = run_cli("status", "-w", str(tmp_path / "w")).stdout
    assert f"torch      {torch.__version__} {info['build']} build" in text
    assert ("no GPU build" in text) == (torch.version.cuda is None)


def test_config_error_names_key_and_allowed_values(tmp_path):
    ws = init_workspace(tmp_path / "w")
    ws.close()
    text = (tmp_path / "w" / "prefloop.toml").read_text().replace('# engine = "hf"', 'engine = "trt"', 1)
    (tmp_path / "w" / "prefloop.toml").write_text(text)
    with pytest.raises(ConfigError) as e:
        cfgmod.load(tmp_path / "w" / "prefloop.toml")
    assert "policy.engine" in str(e.value) and "'hf'" in str(e.value) and "'vllm'" in str(e.value)
    (tmp_path / "w" / "prefloop.toml").write_text(text.replace('engine = "trt"', 'engine = "hf"\nbogus = 1', 1))
    with pytest.raises(ConfigError, match=r"policy\.bogus: unknown key"):
        cfgmod.load(tmp_path / "w" / "prefloop.toml")


def test_not_a_workspace_exit_2(tmp_path):
    r = run_cli("status", "-w", str(tmp_path))
    assert r.returncode == 2
    assert "not a prefloop workspace" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(NotAWorkspace):
        open_workspace(tmp_path)


def test_second_owner_gets_clear_message_exit_3(tmp_path):
    ws = init_workspace(tmp_path / "w", command="prefloop serve")
    try:
        r = run_cli("status", "-w", str(tmp_path / "w"))
        assert r.returncode == 3, r.stderr
        assert f"in use by prefloop serve, pid {os.getpid()}" in r.stderr
        assert "Traceback" not in r.stderr and "IOException" not in r.stderr
    finally:
        ws.close()


def test_stale_owner_file_after_kill9_does_not_block(tmp_path):
    ws = init_workspace(tmp_path / "w")
    ws.close()
    code = ("import time; from storage.workspace import open_workspace\n"
            f"ws = open_workspace({str(tmp_path / 'w')!r}, command='prefloop serve')\n"
            "print('ready', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    with pytest.raises(WorkspaceInUse, match=f"pid {p.pid}"):
        open_workspace(tmp_path / "w")
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    info = json.loads((tmp_path / "w" / "owner.json").read_text())
    assert info["pid"] == p.pid, "kill -9 leaves the info file behind"
    ws = open_workspace(tmp_path / "w", command="test")
    assert json.loads((tmp_path / "w" / "owner.json").read_text())["pid"] == os.getpid()
    ws.close()


def test_secrets_never_written(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", "sk-test-SECRET-123")
    r = run_cli("init", str(tmp_path / "w"))
    assert r.returncode == 0, r.stderr
    for f in (tmp_path / "w").rglob("*"):
        if f.is_file():
            assert b"sk-test-SECRET-123" not in f.read_bytes(), f
