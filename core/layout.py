"""Paths inside a workspace folder, and who owns it (``owner.json``): no database, no model.

Any process may use these: the owner, a job subprocess, a CLI command forwarding to the app.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from core import config as cfgmod
from core.errors import NotAWorkspace

DB_NAME = "prefloop.duckdb"
OWNER_NAME = "owner.json"
SUBDIRS = ("images", "runs", "checkpoints")


@dataclass(frozen=True)
class Layout:
    """Paths inside a workspace folder."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / cfgmod.CONFIG_NAME

    @property
    def db(self) -> Path:
        return self.root / DB_NAME

    @property
    def owner(self) -> Path:
        return self.root / OWNER_NAME

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def round_dir(self, round_id: int) -> Path:
        return self.runs / f"r{round_id:03d}"

    def is_workspace(self) -> bool:
        return self.config.is_file()


def layout(root: str | os.PathLike) -> Layout:
    return Layout(Path(root).expanduser().resolve())


def require_workspace(root: str | os.PathLike) -> Layout:
    lay = layout(root)
    if not lay.is_workspace():
        raise NotAWorkspace(
            f"{lay.root} is not a prefloop workspace (no {cfgmod.CONFIG_NAME}); "
            f"create one with `prefloop init {root}` or pass -w DIR"
        )
    return lay


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_owner(lay: Layout) -> dict | None:
    try:
        return json.loads(lay.owner.read_text())
    except (OSError, ValueError):
        return None
