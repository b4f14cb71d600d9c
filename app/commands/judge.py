"""prefloop judge: score the round's candidates with one judge (gemini, critic, reference)."""

from __future__ import annotations

import argparse

from annotators.critic import MODES
from annotators.registry import DESCRIPTIONS, JUDGES
from app.commands._ws import actor, workspace_for
from app.progress import TerminalEvents
from core.errors import Waiting
from storage import audit


def add_arguments(p: argparse.ArgumentParser) -> None:
    judges = "; ".join(f"{name}: {DESCRIPTIONS.get(name, '')}" for name in JUDGES)
    p.add_argument("--judge", required=True, choices=list(JUDGES), metavar="NAME",
                   help=f"the judge to run ({judges})")
    p.add_argument("--round", type=int, dest="round_id", help="round whose candidates to judge (default: the current)")
    p.add_argument("--limit", type=int, help="at most this many prompts")
    p.add_argument("--mode", choices=list(MODES),
                   help="critic mode (default: judges.critic.mode in prefloop.toml)")
    p.add_argument("--retry-invalid", action="store_true", dest="retry_invalid",
                   help="judge again the candidates whose judgment is invalid or error")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from backend.steps.judge import run_judge

    with workspace_for(args, "prefloop judge") as ws, \
            TerminalEvents(f"judge {args.judge}", verbose=args.verbose, quiet=args.quiet) as events:
        try:
            s = run_judge(ws, args.judge, round_id=args.round_id, limit=args.limit,
                          retry_invalid=args.retry_invalid, mode=args.mode, on_event=events)
        except Waiting as w:  # judges.gemini.mode = "batch": the job runs at Google
            print(f"waits for {w.what}; run the same `prefloop judge` again to pick the results up")
            return 0
        if s["candidates"]:
            audit.record(ws.cursor(), actor(), "judge", {k: v for k, v in s.items() if k != "message"})
    if s.get("message"):
        print(s["message"])
        return 0
    skipped = f", {s['skipped_no_reference']} prompt(s) skipped (no reference)" if s["skipped_no_reference"] else ""
    pairs = f", {s['pairwise_verdicts']} pairwise verdicts" if s["pairwise_verdicts"] else ""
    print(f"round {s['round_id']}: {s['judge']} ({s['judge_version']}) judged {s['candidates']} candidates of "
          f"{s['prompts']} prompts: {s['ok']} ok, {s['invalid']} invalid, {s['error']} error{pairs}{skipped} "
          f"in {s['seconds']} s")
    return 0
