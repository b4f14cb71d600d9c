"""prefloop init DIR [--model tiny|demo|tiny-llava-onevision|tiny-qwen2-vl|tiny-idefics3|HUB_ID|PATH]"""

from __future__ import annotations

import argparse

from backend.models import BUILTIN, check_model_name
from core import config as cfgmod
from storage import rounds
from storage.workspace import init_workspace


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", nargs="?", default=".", help="folder to create (default: current directory)")
    p.add_argument("--model", default="tiny",
                   help=f"policy model: {', '.join(BUILTIN)}, a hub id available offline, or a local folder "
                        "(default: tiny)")
    p.add_argument("--name", default=None, help="a label for the workspace (default: the folder name)")


def run(args: argparse.Namespace) -> int:
    check_model_name(args.model)
    from pathlib import Path

    name = args.name or Path(args.dir).resolve().name or "prefloop"
    cfg = cfgmod.WorkspaceConfig(name=name, policy=cfgmod.PolicyConfig(model=args.model))
    with init_workspace(args.dir, cfg) as ws:
        # a built-in model is built into checkpoints/c0 the first time a job needs it
        base_path = f"checkpoints/{rounds.BASE_CHECKPOINT}" if args.model in BUILTIN else None
        rounds.ensure_first_round(ws.cursor(), base_model=args.model, base_path=base_path)
        print(f"created workspace {ws.root} (policy model: {args.model})")
    return 0
