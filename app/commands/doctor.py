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
    p.add_argument("--smoke", action="store_true",
                   help="instead: run a tiny Qwen2-VL through generate, one DPO step and a merge on this machine's "
                        "accelerator (a few minutes; no workspace needed) and print what ran where")
    p.add_argument("--keep", type=Path, help="--smoke: keep the run folders in this directory")


def smoke(args: argparse.Namespace) -> int:
    import tempfile

    from backend.smoke import run_smoke, table

    def show(row) -> None:
        print(table([row]), flush=True)

    if args.keep:
        rows = run_smoke(args.keep, on_row=show)
    else:
        with tempfile.TemporaryDirectory(prefix="prefloop-smoke-") as tmp:
            rows = run_smoke(Path(tmp), on_row=show)
    failed = [r for r in rows if r.status == "failed"]
    print("\n" + table(rows))
    print(f"smoke run: {sum(r.status == 'ok' for r in rows)} ok, {len(failed)} failed, "
          f"{sum(r.status == 'skipped' for r in rows)} skipped")
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    if args.smoke:
        return smoke(args)
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
