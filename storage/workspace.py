"""The workspace folder and its single owner.

DuckDB lets one process hold the database file read-write, and while it does no other process can
open it at all. DuckDB's own file lock is the authority; the owner also writes ``owner.json`` (pid,
command, start time) so that a second process can say *who* holds the workspace. A stale
``owner.json`` left by ``kill -9`` never blocks: if DuckDB grants the lock, the file is overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from core import config as cfgmod
from core.errors import UsageError, WorkspaceInUse
from core.layout import DB_NAME, OWNER_NAME, SUBDIRS, Layout, layout, pid_alive, read_owner, require_workspace  # noqa: F401  (re-exported for the owner's callers)
from storage import migrations

log = logging.getLogger(__name__)

DEFAULT_MEMORY_LIMIT = "2GB"


def _in_use_message(lay: Layout, duck_msg: str) -> str:
    info = read_owner(lay)
    if info and info.get("pid") and pid_alive(int(info["pid"])):
        return f"the workspace {lay.root} is in use by {info.get('command', 'another process')}, pid {info['pid']}"
    m = re.search(r"PID (\d+)", duck_msg)
    who = f"pid {m.group(1)}" if m else "another process"
    return f"the workspace {lay.root} is in use by {who} (DuckDB holds its lock)"


@dataclass
class Workspace:
    """An open workspace: its layout, validated config and the owner's DuckDB connection.

    Use one ``cursor()`` per thread. ``close()`` (or the context manager) releases the lock.
    """

    lay: Layout
    config: cfgmod.WorkspaceConfig
    con: duckdb.DuckDBPyConnection
    command: str
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def root(self) -> Path:
        return self.lay.root

    def cursor(self) -> duckdb.DuckDBPyConnection:
        with self._lock:
            return self.con.cursor()

    def reload_config(self) -> cfgmod.WorkspaceConfig:
        self.config = cfgmod.load(self.lay.config)
        return self.config

    def save_config(self, cfg: cfgmod.WorkspaceConfig) -> None:
        cfgmod.save(cfg, self.lay.config)
        self.config = cfg

    def close(self) -> None:
        try:
            self.con.close()
        finally:
            info = read_owner(self.lay)
            if info and info.get("pid") == os.getpid():
                try:
                    self.lay.owner.unlink()
                except OSError:
                    pass

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect_owner(lay: Layout, command: str, memory_limit: str = DEFAULT_MEMORY_LIMIT) -> duckdb.DuckDBPyConnection:
    try:
        con = duckdb.connect(str(lay.db), config={"memory_limit": memory_limit})
    except duckdb.IOException as err:
        if "lock" in str(err).lower():
            raise WorkspaceInUse(_in_use_message(lay, str(err))) from None
        raise UsageError(f"cannot open {lay.db}: {err}") from None
    tmp = lay.owner.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "command": command, "host": socket.gethostname(),
                               "started_at": time.time()}))
    tmp.replace(lay.owner)
    return con


def open_workspace(root: str | os.PathLike, command: str = "prefloop", migrate: bool = True) -> Workspace:
    """Open an existing workspace as its single owner (raises WorkspaceInUse if another holds it)."""
    lay = require_workspace(root)
    config = cfgmod.load(lay.config)
    for d in SUBDIRS:
        try:
            (lay.root / d).mkdir(exist_ok=True)
        except OSError as err:
            raise UsageError(f"cannot use {lay.root / d} as the workspace's {d}/ folder: "
                             f"{err.strerror or err}; it must be a writable folder") from None
    con = connect_owner(lay, command)
    if migrate:
        migrations.migrate(con)
        from storage.rounds import fail_stale_steps

        for s in fail_stale_steps(con):
            log.warning("round %s step %s was left running by a dead owner; marked failed", s["round_id"], s["step"])
    return Workspace(lay=lay, config=config, con=con, command=command)


def init_workspace(root: str | os.PathLike, config: cfgmod.WorkspaceConfig | None = None,
                   command: str = "prefloop init") -> Workspace:
    """Create a workspace folder (idempotent for the folders; refuses to overwrite a config)."""
    lay = layout(root)
    if lay.config.exists():
        raise UsageError(f"{lay.root} is already a prefloop workspace; open it with -w {root}")
    lay.root.mkdir(parents=True, exist_ok=True)
    for d in SUBDIRS:
        (lay.root / d).mkdir(exist_ok=True)
    cfgmod.save(config or cfgmod.WorkspaceConfig(), lay.config)
    return open_workspace(lay.root, command=command)
