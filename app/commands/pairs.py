"""prefloop pairs: build the current round's chosen/rejected pairs with a strategy (human labels win)."""

from __future__ import annotations

import argparse

from backend.pairs import STRATEGIES
from backend.steps.pairs import run_pairs
from storage.workspace import open_workspace


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--strategy", choices=list(STRATEGIES),
                   help="pair strategy (default: pairs.strategy in prefloop.toml): "
                        + "; ".join(f"{k}: {(v.python.__doc__ or '').strip().splitlines()[0]}"
                                   for k, v in STRATEGIES.items()))
    p.add_argument("--judge", help="judge whose scores rank candidates (best-worst, best-vs-random)")
    p.add_argument("--min-margin", type=float, dest="min_margin",
                   help="best-vs-random: minimum helpfulness+correctness+coherence gap, inclusive (default 2)")
    p.add_argument("--seed", type=int, help="seed for random choices")


def run(args: argparse.Namespace) -> int:
    with open_workspace(args.workspace, command="prefloop pairs") as ws:
        s = run_pairs(ws, strategy=args.strategy, judge=args.judge, min_margin=args.min_margin, seed=args.seed)
    src = ", ".join(f"{k} {v}" for k, v in sorted(s["by_source"].items())) or "none"
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(s["skipped"].items())) or "none"
    print(f"round {s['round_id']}: {s['pairs']} pairs ({s['strategy']}; by source: {src}); skipped prompts: {skipped}")
    if s["skipped"] or not s["pairs"]:
        print(s["message"])
    elif s["lengths"]:
        print(s["lengths"])
    if s["needs_admin"]:
        print(f"annotators tied on {len(s['needs_admin'])} prompts (dropped until an admin decides): "
              + ", ".join(s["needs_admin"][:20]))
    return 0
