"""prefloop generate: k candidates per train prompt from the current round's policy checkpoint."""

from __future__ import annotations

import argparse

from app.progress import TerminalEvents
from backend.steps.generate import run_generate
from storage.workspace import open_workspace


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, help="candidates per prompt (default: generation.k)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: generation.temperature)")
    p.add_argument("--top-p", type=float, dest="top_p", help="nucleus sampling (default: generation.top_p)")
    p.add_argument("--max-new-tokens", type=int, dest="max_new_tokens", help="answer length cap in tokens")
    p.add_argument("--seed", type=int, help="base seed")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="prompts per generate() call")
    p.add_argument("--views", type=lambda s: [v.strip() for v in s.split(",") if v.strip()],
                   help="comma-separated views, e.g. original,aug:diffusion:500 (SeVa)")
    p.add_argument("--limit", type=int, help="at most this many prompts")
    p.add_argument("--prompt", action="append", dest="prompt_ids", help="only this prompt id (repeatable)")
    p.add_argument("--split", choices=["train", "heldout"], default="train", help="which prompts (default: train)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    overrides = {k: getattr(args, k) for k in ("k", "temperature", "top_p", "max_new_tokens", "seed",
                                               "batch_size", "views")}
    with open_workspace(args.workspace, command="prefloop generate") as ws, \
            TerminalEvents("generate", verbose=args.verbose, quiet=args.quiet) as events:
        s = run_generate(ws, overrides=overrides, limit=args.limit, prompt_ids=args.prompt_ids, split=args.split,
                         on_event=events)
    if s.get("message"):
        print(s["message"])
    else:
        print(f"round {s['round_id']}: {s['candidates']} candidates for {s['prompts']} prompts from "
              f"{s['checkpoint_id']} in {s['seconds']} s")
    return 0
