"""prefloop init DIR [--model tiny|demo|HUB_ID|PATH]"""

from __future__ import annotations

import argparse

from backend.models import check_model_name
from core import config as cfgmod
from storage import rounds
from storage.workspace import init_workspace


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", nargs="?", default=".", help="folder to create (default: current directory)")
    p.add_argument("--model", default="tiny",
                   help="policy model: tiny, demo, a hub id available offline, or a local folder (default: tiny)")
    p.add_argument("--name", default=None, help="a label for the workspace (default: the folder name)")


def run(args: argparse.Namespace) -> int:
    check_model_name(args.model)
    from pathlib import Path

    name = args.name or Path(args.dir).resolve().name or "prefloop"
    cfg = cfgmod.WorkspaceConfig(name=name, policy=cfgmod.PolicyConfig(model=args.model))
    with init_workspace(args.dir, cfg) as ws:
        rounds.ensure_first_round(ws.cursor(), base_model=args.model)
        print(f"created workspace {ws.root} (policy model: {args.model})")
    return 0
