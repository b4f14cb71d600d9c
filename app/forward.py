"""CLI forwarding, client side: run a command inside the running ``prefloop serve`` that owns the workspace.

While the studio runs it holds the database (DuckDB allows one process), so ``prefloop import``,
``users``, ``judge``, ``export``, ``snapshot`` and ``round`` would fail on the lock. Instead, when one of
them hits ``WorkspaceInUse``, ``app.cli.main`` calls ``forward``: it reads ``<workspace>/admin.json``
(the app's admin URL and pid, written at launch) and the token in ``<workspace>/admin.token`` (mode
0600: only the user running the app — or root — can read it, so only they can forward), and POSTs
``{"argv", "stdin", "user"}`` to the app, which runs the command in-process on its own open workspace
and returns ``{"code", "stdout", "stderr"}``. The outputs are printed and the code is the exit code.

Before sending, ``-w/--workspace`` is dropped (the app uses its own workspace) and relative file paths
(``import FILE``, ``--reject-report``, ``export --out``, ``snapshot OUT``, ``round start --config``) are
made absolute, since the app runs in another folder. ``users add|passwd`` read the password here
(getpass twice on a terminal, else one line of stdin) and send it as the command's stdin; the token
and passwords are never printed or logged. A forwarded ``round start`` returns at once: the round runs
in the app's background runner (follow it in the Rounds tab or with ``prefloop round status``).
Any other command, or no reachable app, gets the usual "in use by prefloop serve, pid N" error.
"""

from __future__ import annotations

import argparse
import getpass
import importlib
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

FORWARDABLE = frozenset({"import", "users", "judge", "export", "snapshot", "round"})
INFO_NAME = "admin.json"
TOKEN_NAME = "admin.token"
ADMIN_PATH = "/prefloop-admin/run"
PATH_OPTIONS = {"import": {"reject_report"}, "export": {"out"}, "round": {"config"}}
"""Options (argparse dests) whose value is a file path on the caller's machine, per command."""
PATH_POSITIONAL = {"import": 0, "snapshot": 0}
"""Commands whose n-th positional argument is a file path."""
WORKSPACE_FLAGS = ("-w", "--workspace")


def command_parser(name: str) -> argparse.ArgumentParser:
    """The full argument parser of one command, as ``app.cli.main`` builds it."""
    from app import cli

    module = importlib.import_module(cli.COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"prefloop {name}", description=cli.COMMANDS[name][1])
    if name not in cli.NO_WORKSPACE_FLAG:
        cli._add_workspace(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    module.add_arguments(parser)
    return parser


def _value_options(parser: argparse.ArgumentParser) -> dict[str, str]:
    """option string -> dest, for every option that takes a value (subcommands included)."""
    out: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out.update(_value_options(sub))
        elif action.option_strings and action.nargs != 0:
            out.update({s: action.dest for s in action.option_strings})
    return out


def strip_workspace(argv: list[str]) -> list[str]:
    """``argv`` without any ``-w DIR`` / ``--workspace DIR`` / ``--workspace=DIR`` / ``-wDIR``."""
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            out += argv[i:]
            break
        if tok in WORKSPACE_FLAGS:
            i += 2
            continue
        if tok.startswith("--workspace=") or (tok.startswith("-w") and not tok.startswith("--") and len(tok) > 2):
            i += 1
            continue
        out.append(tok)
        i += 1
    return out


def _absolute(value: str, cwd: Path) -> str:
    p = Path(value).expanduser()
    return value if p.is_absolute() else str((cwd / p).resolve())


def rewrite_paths(argv: list[str], cwd: Path | None = None) -> list[str]:
    """``argv`` (command first) with relative file paths made absolute against ``cwd`` (default: here)."""
    cwd = cwd or Path.cwd()
    command = argv[0]
    paths = PATH_OPTIONS.get(command, set())
    positional_at = PATH_POSITIONAL.get(command)
    values = _value_options(command_parser(command))
    out, i, seen_pos, only_pos = [command], 1, 0, False
    while i < len(argv):
        tok = argv[i]
        if not only_pos and tok == "--":
            only_pos = True
            out.append(tok)
        elif not only_pos and tok.startswith("--") and "=" in tok:
            opt, _, val = tok.partition("=")
            out.append(f"{opt}={_absolute(val, cwd)}" if values.get(opt) in paths else tok)
        elif not only_pos and tok in values:
            out.append(tok)
            if i + 1 < len(argv):
                i += 1
                out.append(_absolute(argv[i], cwd) if values[tok] in paths else argv[i])
        elif not only_pos and tok.startswith("-") and tok != "-":
            out.append(tok)
        else:
            out.append(_absolute(tok, cwd) if positional_at == seen_pos else tok)
            seen_pos += 1
        i += 1
    return out


def admin_info(root: Path) -> dict | None:
    """The running app's {url, pid} when admin.json names a live process that owns the workspace."""
    from core.layout import layout, pid_alive, read_owner

    try:
        info = json.loads((root / INFO_NAME).read_text())
        pid = int(info["pid"])
        url = str(info["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    owner = read_owner(layout(root)) or {}
    if not pid_alive(pid) or owner.get("pid") != pid:
        return None  # left behind by an app that stopped
    return {"url": url, "pid": pid}


def _stdin_for(args: argparse.Namespace) -> str | None:
    if args.command == "users" and getattr(args, "action", None) in ("add", "passwd"):
        from app.commands.users import read_password

        return read_password(args.name) + "\n"
    return None


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError, ImportError):  # no name for this uid
        return "unknown"


def _say(text: str) -> None:
    print(f"prefloop: {text}", file=sys.stderr)


def forward(argv: list[str], args: argparse.Namespace) -> int | None:
    """Run ``argv`` in the app that holds ``args.workspace``; its exit code, or None when it cannot be forwarded
    (the caller then reports the workspace as in use)."""
    from app.commands._ws import serving_workspace

    if args.command not in FORWARDABLE or serving_workspace.get() is not None:
        return None
    root = Path(args.workspace).expanduser().resolve()
    info = admin_info(root)
    if info is None:
        return None
    try:
        token = (root / TOKEN_NAME).read_text().strip()
    except PermissionError:
        _say(f"cannot read {root / TOKEN_NAME}: only the user running `prefloop serve` can send commands to it")
        return None
    except OSError:
        return None
    from core.errors import PrefloopError

    try:
        stdin = _stdin_for(args)
    except PrefloopError as err:
        print(f"prefloop {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    body = {"argv": rewrite_paths(strip_workspace(argv)), "stdin": stdin, "user": _login()}
    req = urllib.request.Request(info["url"], data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=None) as resp:
            result = json.loads(resp.read())
    except urllib.error.HTTPError as err:
        try:
            detail = json.loads(err.read()).get("error", "")
        except ValueError:
            detail = ""
        _say(f"the running app (pid {info['pid']}) refused the command: HTTP {err.code} {detail}".rstrip())
        return 3
    except (urllib.error.URLError, OSError, ValueError) as err:
        _say(f"could not reach the running app at {info['url']} ({getattr(err, 'reason', err)})")
        return None
    sys.stdout.write(result.get("stdout", ""))
    sys.stdout.flush()
    sys.stderr.write(result.get("stderr", ""))
    sys.stderr.flush()
    return int(result.get("code", 1))
