"""prefloop serve -w WS [--host 127.0.0.1] [--port 7860]: the review studio.

The app process is the database's single owner while it runs. Behind a TLS reverse proxy, run it
with ``--host 0.0.0.0`` (or keep 127.0.0.1 with the proxy on the same machine) and ``--root-path``
when the proxy serves it under a sub-path.
"""

from __future__ import annotations

import argparse
import logging
import signal

from core.errors import UsageError
from storage import users as users_db
from storage.workspace import open_workspace

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 behind a reverse proxy)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--root-path", default=None, help="URL prefix when a proxy serves the app under a sub-path")
    p.add_argument("--concurrency", type=int, default=8, help="requests of one kind handled at once (default 8)")


def _stop(signum, frame):  # SIGTERM: close the server and release the database like Ctrl-C does
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from app.server import AppContext
    from app.server.app import launch

    with open_workspace(args.workspace, command="prefloop serve") as ws:
        if users_db.count_users(ws.cursor(), "admin") == 0:
            raise UsageError(f"no admin user in {ws.root}: add one first with "
                             f"`prefloop users add NAME --role admin -w {args.workspace}`")
        ctx = AppContext(ws, concurrency=args.concurrency)
        signal.signal(signal.SIGTERM, _stop)
        print(f"prefloop serve: {ws.root} on http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
        launch(ctx, args.host, args.port, root_path=args.root_path, quiet=True)
    return 0
