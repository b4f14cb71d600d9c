"""prefloop doctor: preflight checks of the next round (models, GPUs, memory estimate, lengths, keys, disk)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from app.commands._ws import workspace_for
from backend import doctor, loop


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="check the run a recipe would make (backend/recipes/NAME.toml)")
    p.add_argument("--config", type=Path, help="a TOML file of config overrides, as `round start --config`")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="one setting, as `round start --set`")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    with workspace_for(args, "prefloop doctor") as ws:
        config, _ = loop.resolve_config(ws, args.recipe, args.config, args.set)
        checks = doctor.run_checks(doctor.context_for(ws, config))
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        print(doctor.table(checks))
    failed = doctor.failed(checks)
    if failed and not args.json:
        print(f"{len(failed)} check(s) failed: `round start` stops on them (--force runs anyway)")
    return 1 if failed else 0
