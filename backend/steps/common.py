"""Shared pieces of the owner-side steps: checkpoint folders, run folders, step bookkeeping."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

from backend import models
from core.errors import JobFailed, PrefloopError
from storage import rounds
from storage.workspace import Workspace


def checkpoint_path(ws: Workspace, checkpoint_id: str) -> Path:
    """The loadable folder of a checkpoint (builds the built-in base model into the workspace once)."""
    row = rounds.get_checkpoint(ws.cursor(), checkpoint_id)
    if row is None:
        raise PrefloopError(f"checkpoint {checkpoint_id} is not in this workspace")
    if row["kind"] == "base" and row["base_model"] in models.BUILTIN:
        return models.materialize(row["base_model"], ws.root / row["path"])
    p = Path(row["path"])
    return p if p.is_absolute() or not (ws.root / p).exists() else ws.root / p


def step_dir(ws: Workspace, round_id: int, step: str, fresh: bool = False) -> Path:
    d = ws.lay.round_dir(round_id) / step
    if fresh and d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextmanager
def tracked_step(ws: Workspace, round_id: int, step: str, run_dir: Path):
    """Record a step as running, then done or failed (with the error a person can act on)."""
    cur = ws.cursor()
    rounds.start_step(cur, round_id, step, str(run_dir.relative_to(ws.root)))
    try:
        yield
    except (PrefloopError, JobFailed) as err:
        rounds.finish_step(cur, round_id, step, "failed", error=str(err))
        raise
    except BaseException as err:
        rounds.finish_step(cur, round_id, step, "failed", error=f"{type(err).__name__}: {err}")
        raise
