"""CLI forwarding, server side: an authenticated admin endpoint on the studio's FastAPI app.

At launch the app makes a random token, writes it to ``<workspace>/admin.token`` and its URL and pid to
``<workspace>/admin.json`` (both mode 0600, replaced atomically), and adds ``POST /prefloop-admin/run``
to Gradio's FastAPI app. A request carries ``Authorization: Bearer <token>`` (compared in constant time)
and ``{"argv": [...], "stdin": str | null, "user": "<login>"}``; the app runs ``app.cli.main(argv)``
in-process with ``serving_workspace`` set to a copy of its open workspace (the connection is shared;
a ``--recipe`` override stays with that command) and ``serving_actor`` to ``cli:<login>``, with this
thread's stdout/stderr captured and ``stdin`` as its input, and answers ``{"code", "stdout", "stderr"}``.

Forwarded commands run one at a time (a lock). Only ``FORWARDABLE`` commands are accepted. ``round
start`` and ``round resume`` start the round in the app's background runner and answer at once (the
Rounds tab shows its progress; ``prefloop round status`` too); ``round cancel`` asks the runner to stop;
``judge`` runs in the request and holds the runner meanwhile, so it never overlaps a round. Every
forwarded command and every refused request is in the audit log (never the token or stdin).

Whoever can read the token file is treated as the app's operator: a forwarded command reads and writes
files as the app's OS user (``import FILE``, ``export --out``, ``snapshot OUT``).
"""

from __future__ import annotations

import atexit
import contextlib
import hmac
import io
import json
import logging
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

from fastapi import Body, Header
from fastapi.responses import JSONResponse

from app.forward import ADMIN_PATH, FORWARDABLE, INFO_NAME, TOKEN_NAME, command_parser, strip_workspace
from app.server import AppContext
from app.server.runner import Studio, cancel_round, start_round, studio_of, workspace_copy
from backend import loop
from core.errors import PrefloopError, UsageError
from storage import audit

log = logging.getLogger(__name__)

MAX_ARGS = 256
MAX_ARG_LEN = 16_384
MAX_STDIN = 65_536
LOCK_WAIT_S = 600.0
USER_RE = re.compile(r"[^A-Za-z0-9_.@-]")


class _ThreadStream:
    """A stand-in for sys.stdout/stderr: writes from the capturing thread go to its buffer, others pass on."""

    def __init__(self, default, buffer: io.StringIO, owner: int):
        self._default, self._buffer, self._owner = default, buffer, owner

    def _target(self):
        return self._buffer if threading.get_ident() == self._owner else self._default

    def write(self, s: str) -> int:
        return self._target().write(s)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._target().flush()

    def isatty(self) -> bool:
        t = self._target()
        return False if t is self._buffer else t.isatty()

    def fileno(self) -> int:
        if self._target() is self._buffer:
            raise io.UnsupportedOperation("fileno")
        return self._default.fileno()

    def __getattr__(self, name):
        return getattr(self._default, name)


@contextlib.contextmanager
def captured(stdin: str | None) -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """Capture this thread's stdout/stderr and give it ``stdin`` (call only under the forwarding lock)."""
    out, err = io.StringIO(), io.StringIO()
    me = threading.get_ident()
    saved = sys.stdout, sys.stderr, sys.stdin
    sys.stdout, sys.stderr = _ThreadStream(saved[0], out, me), _ThreadStream(saved[1], err, me)
    sys.stdin = io.StringIO(stdin or "")
    try:
        yield out, err
    finally:
        sys.stdout, sys.stderr, sys.stdin = saved


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 (a fresh file renamed into place)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


class AdminAPI:
    """The admin endpoint of one app: its token, the files that advertise it, and the forwarded-command runner."""

    def __init__(self, ctx: AppContext, token: str | None = None):
        self.ctx = ctx
        self.studio: Studio = studio_of(ctx)
        self.token = token or secrets.token_urlsafe(32)
        self.url: str | None = None

    # ------------------------------------------------------------------------------ publishing

    def publish(self, url: str) -> None:
        """Write admin.token and admin.json (0600) so the CLI on this machine can find the endpoint."""
        lay = self.ctx.ws.lay
        self.url = url
        _write_private(lay.root / TOKEN_NAME, self.token + "\n")
        _write_private(lay.root / INFO_NAME, json.dumps({"url": url, "pid": os.getpid(), "started_at": time.time()}))
        atexit.register(self.close)

    def close(self) -> None:
        """Remove the files (only if they are still ours)."""
        root = self.ctx.ws.lay.root
        try:
            info = json.loads((root / INFO_NAME).read_text())
        except (OSError, ValueError):
            return
        if info.get("pid") == os.getpid() and info.get("url") == self.url:
            for name in (INFO_NAME, TOKEN_NAME):
                with contextlib.suppress(OSError):
                    (root / name).unlink()

    # ------------------------------------------------------------------------------ requests

    def authorized(self, header: str | None) -> bool:
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())

    def handle(self, authorization: str | None, payload) -> tuple[int, dict]:
        """(HTTP status, JSON body) for one request; the route and the tests call this."""
        if not self.authorized(authorization):
            with self.ctx.cursor() as cur:
                audit.record(cur, "cli", "forward_refused", {"reason": "missing or wrong admin token"})
            log.warning("admin API: refused a request with a missing or wrong token")
            return 401, {"error": "missing or wrong admin token"}
        try:
            argv, stdin, user = self._parse(payload)
        except UsageError as err:
            return 400, {"error": str(err)}
        actor = f"cli:{user}"
        code, out, err = self.execute(argv, stdin, actor)
        with self.ctx.cursor() as cur:
            audit.record(cur, actor, "forward", {"argv": argv, "code": code})
        return 200, {"code": code, "stdout": out, "stderr": err}

    @staticmethod
    def _parse(payload) -> tuple[list[str], str | None, str]:
        if not isinstance(payload, dict):
            raise UsageError("expected a JSON object {argv, stdin, user}")
        argv, stdin, user = payload.get("argv"), payload.get("stdin"), payload.get("user") or "unknown"
        if (not isinstance(argv, list) or not argv or len(argv) > MAX_ARGS
                or not all(isinstance(a, str) and len(a) <= MAX_ARG_LEN for a in argv)):
            raise UsageError(f"argv must be a non-empty list of at most {MAX_ARGS} strings")
        if argv[0] not in FORWARDABLE:
            raise UsageError(f"`prefloop {argv[0]}` cannot run inside the app; forwardable: {', '.join(sorted(FORWARDABLE))}")
        if stdin is not None and (not isinstance(stdin, str) or len(stdin) > MAX_STDIN):
            raise UsageError("stdin must be a string of at most 64 KiB")
        if not isinstance(user, str):
            raise UsageError("user must be a string")
        return argv, stdin, USER_RE.sub("_", user)[:64] or "unknown"

    def execute(self, argv: list[str], stdin: str | None, actor: str) -> tuple[int, str, str]:
        """Run one forwarded command in this process; (exit code, stdout, stderr)."""
        argv = [argv[0], "-w", str(self.ctx.ws.root), *strip_workspace(argv[1:])]
        if not logging.getLogger().handlers:  # else cli.main's basicConfig would bind a handler to the capture
            logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        if not self.studio.forward_lock.acquire(timeout=LOCK_WAIT_S):
            return 1, "", f"prefloop {argv[0]}: another forwarded command has been running for {LOCK_WAIT_S:.0f} s; try again\n"
        try:
            with captured(stdin) as (out, err):
                code = self._run(argv, actor)
            return code, out.getvalue(), err.getvalue()
        finally:
            self.studio.forward_lock.release()

    def _run(self, argv: list[str], actor: str) -> int:
        from app import cli
        from app.commands._ws import serving_actor, serving_workspace

        ws = workspace_copy(self.ctx.ws)
        t_ws, t_actor = serving_workspace.set(ws), serving_actor.set(actor)
        try:
            if argv[0] == "round":
                handled = self._round(argv, ws, actor)
                if handled is not None:
                    return handled
            if argv[0] == "judge":
                with self.studio.runner.hold("judge", "judge (forwarded from the CLI)", actor):
                    return int(cli.main(argv) or 0)
            return int(cli.main(argv) or 0)
        except SystemExit as e:  # argparse: -h, usage errors
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        except PrefloopError as err:
            print(f"prefloop {argv[0]}: {err}", file=sys.stderr)
            return err.exit_code
        except Exception as err:  # a bug: the traceback stays in the server log
            log.exception("forwarded command %s failed", argv[:2])
            print(f"prefloop {argv[0]}: internal error in the app: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
        finally:
            serving_workspace.reset(t_ws)
            serving_actor.reset(t_actor)

    def _round(self, argv: list[str], ws, actor: str) -> int | None:
        """``round start|resume|cancel`` through the app's runner; None for the other actions (run as usual)."""
        args = command_parser("round").parse_args(argv[1:])
        pid = os.getpid()
        if args.action == "cancel":
            print(cancel_round(self.studio, actor, via="cli"))
            return 0
        if args.action not in ("start", "resume"):
            return None
        try:
            plan = loop.plan_round(ws, args)
        except loop.NothingToResume as nothing:
            print(nothing)
            return 0
        run = start_round(self.studio, actor, plan, via="cli")
        print(f"{run['label']} started in the running app (pid {pid}); it runs in the background there. Follow it "
              "in the studio's Rounds tab or with `prefloop round status`; `prefloop round cancel` stops it.")
        return 0


def mount(ctx: AppContext, demo, host: str, token: str | None = None) -> AdminAPI:
    """Add the admin route to a launched app and publish its URL and token in the workspace.

    (FastAPI reads the route's parameter annotations as strings here: their names must be module globals.)"""
    api = AdminAPI(ctx, token)

    def run_forwarded(payload: Annotated[dict, Body()], authorization: Annotated[str | None, Header()] = None):
        status, body = api.handle(authorization, payload)
        return JSONResponse(body, status_code=status)

    demo.app.add_api_route(ADMIN_PATH, run_forwarded, methods=["POST"], include_in_schema=False)
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "", "localhost") else (f"[{host}]" if ":" in host else host)
    api.publish(f"http://{local}:{demo.server_port}{ADMIN_PATH}")
    log.info("admin API for CLI forwarding at %s", api.url)
    return api
