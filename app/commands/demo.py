"""prefloop demo [DIR]: a workspace of real photos with fluent candidate answers, scored, in a running studio.

Builds (once) a workspace at DIR (default ./demo-workspace) on the `demo` model (SmolLM2-135M-Instruct
joined to an untrained vision tower: its answers are fluent English, but it does not really see the
images), imports ~25 real photos from scikit-image with questions plus a few easy-vqa prompts with
reference answers, generates k candidates per prompt (plus a SeVa diffusion view, so the first
"Start round" has pairs without any API key), judges them with the `reference` judge (and `gemini`
when GEMINI_API_KEY or GOOGLE_API_KEY is set), creates an admin user whose generated password is
printed once, and starts the studio. Run it again and it only starts the studio.
"""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path

from app.progress import TerminalEvents
from backend.models import check_model_name
from core import config as cfgmod
from storage import rounds
from storage import users as users_db
from storage.workspace import init_workspace, layout, open_workspace

MARKER = "demo.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", nargs="?", default="demo-workspace", help="workspace folder (default: ./demo-workspace)")
    p.add_argument("--model", default="demo", help="policy model: demo (default) or tiny (fast, noise answers)")
    p.add_argument("--k", type=int, default=4, help="candidates per prompt (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=40, dest="max_new_tokens",
                   help="answer length cap in tokens (default 40)")
    p.add_argument("--prompts", type=int, default=None, help="use at most this many prompts (default: all)")
    p.add_argument("--host", default="127.0.0.1", help="interface for the studio (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port for the studio (default 7860)")
    p.add_argument("--no-serve", action="store_true", help="build the workspace, do not start the studio")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def demo_config(name: str, model: str, k: int, max_new_tokens: int) -> cfgmod.WorkspaceConfig:
    judges = ["reference"] + (["gemini"] if os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY")
                              else [])
    return cfgmod.validate({
        "name": name,
        "policy": {"model": model},
        "generation": {"k": k, "max_new_tokens": max_new_tokens, "temperature": 0.8, "batch_size": 4,
                       "views": ["original", "aug:diffusion:500"]},
        "pairs": {"strategy": "seva"},
        "judges": {"default": judges},
        "train": {"batch_size": 2, "max_completion_length": max_new_tokens + 8, "learning_rate": 5e-5},
        "round": {"eval_judge": "reference"},
    }, "demo config")


def build(args: argparse.Namespace) -> tuple[Path, str | None]:
    """Create and fill the demo workspace; returns (root, admin password or None if it existed)."""
    from app.demo_content import write_demo_import
    from app.importer import import_path
    from backend.steps.generate import run_generate
    from backend.steps.judge import run_judge

    lay = layout(args.dir)
    if (lay.root / MARKER).is_file():
        return lay.root, None
    check_model_name(args.model)
    cfg = demo_config(lay.root.name, args.model, args.k, args.max_new_tokens)
    with (init_workspace(lay.root, cfg, command="prefloop demo") if not lay.is_workspace()
          else open_workspace(lay.root, command="prefloop demo")) as ws:
        cur = ws.cursor()
        rounds.ensure_first_round(cur, base_model=args.model)
        jsonl = write_demo_import(lay.root / "demo-data")
        if args.prompts:
            lines = jsonl.read_text().splitlines()[: args.prompts]
            jsonl.write_text("\n".join(lines) + "\n")
        res = import_path(ws, jsonl, progress=not args.quiet, source="demo")
        print(res.summary(), flush=True)
        with TerminalEvents("generate", quiet=args.quiet) as ev:
            g = run_generate(ws, on_event=ev)
        print(f"generated {g.get('candidates', 0)} candidates in {g.get('seconds', 0)} s", flush=True)
        for judge in ws.config.judges.default:
            with TerminalEvents(f"judge {judge}", quiet=args.quiet) as ev:
                s = run_judge(ws, judge, on_event=ev)
            print(f"judge {judge}: {s.get('ok', 0)} ok, {s.get('invalid', 0)} invalid, {s.get('error', 0)} errors",
                  flush=True)
        password = None
        if users_db.count_users(cur, "admin") == 0:
            password = secrets.token_urlsafe(12)
            users_db.add_user(cur, "admin", "admin", password)
        (lay.root / MARKER).write_text('{"built_by": "prefloop demo"}\n')
    return lay.root, password


def run(args: argparse.Namespace) -> int:
    root, password = build(args)
    if password:
        print(f"\nadmin user: admin   password: {password}   (shown once; change it with "
              f"`prefloop users passwd admin -w {root}`)")
    else:
        print(f"\n{root} is ready (log in as admin with the password printed when it was built, or set a new "
              f"one with `prefloop users passwd admin -w {root}`)")
    if args.model == "demo":
        print("note: the demo model writes fluent English but does not really see the images "
              "(its vision tower is untrained)")
    if args.no_serve:
        return 0
    from app.commands import serve

    return serve.run(argparse.Namespace(workspace=str(root), host=args.host, port=args.port, root_path=None,
                                        concurrency=8, verbose=False))
