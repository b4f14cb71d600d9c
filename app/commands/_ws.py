"""How a command gets its workspace: its own owner connection, or the running app's.

While ``prefloop serve`` owns a workspace, the commands a lead needs (import, users, judge, export,
round) are forwarded to it through the admin API and run inside the server process; there
``serving_workspace`` is set, and ``workspace_for`` hands out the server's open workspace instead of
opening (and failing on) the database lock.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

from storage.workspace import Workspace, open_workspace

serving_workspace: contextvars.ContextVar[Workspace | None] = contextvars.ContextVar("serving_workspace", default=None)
serving_actor: contextvars.ContextVar[str] = contextvars.ContextVar("serving_actor", default="cli")


@contextmanager
def workspace_for(args, command: str) -> Iterator[Workspace]:
    ws = serving_workspace.get()
    if ws is not None:
        yield ws
        return
    with open_workspace(args.workspace, command=command) as ws:
        yield ws


def actor() -> str:
    """Who runs this command: the app user a forwarded command came from, else `cli:<login>`."""
    import getpass

    a = serving_actor.get()
    if a != "cli":
        return a
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return "cli"
