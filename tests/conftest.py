"""Shared fixtures: offline environment, a session-wide tiny model, fresh workspaces, test images."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def torch_threads_as_in_a_job():
    """torch in the test process uses as many threads as a job would (backend.job_runner.torch_threads,
    unless OMP_NUM_THREADS is set): its default, one per core, oversubscribes the cores beside the jobs,
    servers and browsers the tests start (on 2 busy cores test_ref_cache's in-process trainings took 40 s
    with 2 threads, 7 s with 1)."""
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        from backend.job_runner import torch_threads

        torch.set_num_threads(torch_threads())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny VLM built once per test session (model + processor in one folder)."""
    from backend.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict:
    """Each tiny real-family build (backend.tiny_families.BUILDERS) built once per session, through
    backend.models.materialize."""
    from backend import models
    from backend.tiny_families import BUILDERS

    root = tmp_path_factory.mktemp("families")
    return {name: models.materialize(name, root / name) for name in BUILDERS}


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


@pytest.fixture
def db():
    """A fresh in-memory database with every migration applied (no workspace folder): for tests of
    `storage` functions that need tables but no images on disk, config or model."""
    import duckdb

    from storage import migrations

    con = duckdb.connect(":memory:")
    migrations.migrate(con)
    yield con
    con.close()
