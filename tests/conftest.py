"""Shared fixtures: offline environment, a session-wide tiny model, fresh workspaces, test images."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny VLM built once per test session (model + processor in one folder)."""
    from backend.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def workspace(tmp_path, tiny_model_dir):
    """A fresh, open workspace on the tiny model (c0 pre-built from the session's tiny folder)."""
    from storage import rounds
    from storage.workspace import init_workspace

    ws = init_workspace(tmp_path / "ws")
    shutil.copytree(tiny_model_dir, ws.lay.checkpoints / "c0")
    rounds.ensure_first_round(ws.cursor(), base_model="tiny")
    yield ws
    ws.close()


def make_image(path: Path, size=(48, 40), color=(200, 30, 30), fmt: str | None = None) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    for x in range(0, size[0], 7):
        img.putpixel((x, x % size[1]), (x % 255, 255 - x % 255, 100))
    img.save(path, format=fmt)
    return path


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, input: str | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `prefloop ARGS` in a real subprocess (as a user would)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "app.cli", *args], check=False, cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, input=input, timeout=timeout)


def review_workspace(root: Path, tiny_model_dir: Path, rows: list[dict], changes: dict, name: str | None = None):
    """An open workspace on `tiny` with ``rows`` imported (``prefloop import`` JSONL rows whose ``image`` names
    a file already under ``root/data``) and ``changes`` applied to the config; round 1 stands at its review
    step (the answers were imported, so generate and judge have nothing to do)."""
    import json

    from app.importer import import_path
    from core import config as cfgmod
    from storage import rounds
    from storage.workspace import init_workspace

    data = root / "data"
    (data / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    base = cfgmod.WorkspaceConfig(policy=cfgmod.PolicyConfig(model="tiny"), **({"name": name} if name else {}))
    ws = init_workspace(root / "ws", cfgmod.update(base, changes))
    shutil.copytree(tiny_model_dir, ws.lay.checkpoints / "c0")
    cur = ws.cursor()
    rounds.ensure_first_round(cur, base_model="tiny")
    import_path(ws, data / "q.jsonl", progress=False)
    rounds.set_round(cur, 1, step="review")
    return ws
