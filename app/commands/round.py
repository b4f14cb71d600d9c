"""prefloop round start|resume|status|cancel: the iterative loop as a resumable state machine."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from app.commands._ws import actor, workspace_for
from app.progress import TerminalEvents
from backend import loop
from storage import rounds


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = sub.add_parser("start", help="train N rounds from where the current round stands, then stop at the "
                                     "next round's review")
    s.add_argument("--rounds", type=int, default=None,
                   help="rounds to train (default: the recipe's round count, else 1)")
    s.add_argument("--recipe", help="a packaged recipe by name (backend/recipes/NAME.toml); what prefloop.toml "
                                    "sets wins over it")
    s.add_argument("--config", type=Path, help="a TOML file of config overrides for these rounds (wins over "
                                               "prefloop.toml)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="one setting for these rounds, wins over everything (repeatable), e.g. --set "
                        "train.num_processes=2; the round's saved config says where each value came from")
    s.add_argument("--force", action="store_true",
                   help="start even when a preflight check (`prefloop doctor`) fails")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    r = sub.add_parser("resume", help="continue after a crash, a cancel or a review gate")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    st = sub.add_parser("status", help="the rounds, their steps and the current state")
    st.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser("cancel", help="stop the running round's job (works from another terminal)")
    for sp in sub.choices.values():  # `prefloop round start -w DIR` as well as `prefloop round -w DIR start`
        sp.add_argument("-w", "--workspace", default=argparse.SUPPRESS, help="workspace folder")
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug messages")


def _run(plan: loop.RoundRun, quiet: bool, verbose: bool) -> dict:
    def show_steps(ev, inner):
        if ev.get("event") == "step" and not quiet:
            extra = f" ({ev['seconds']} s)" if ev.get("status") == "done" else ""
            print(f"round {ev['round_id']}: {ev['step']} {ev['status']}{extra}", flush=True)
        inner(ev)

    with TerminalEvents("round", verbose=verbose, quiet=quiet) as events:
        return plan.run(on_event=lambda ev: show_steps(ev, events))


def run(args: argparse.Namespace) -> int:
    if args.action == "cancel":
        loop.request_cancel(args.workspace)
        print("cancel requested: the owner stops the running job; `prefloop round resume` continues later")
        return 0
    with workspace_for(args, f"prefloop round {args.action}") as ws:
        if args.action == "status":
            return _status(ws, args.json)
        try:
            plan = loop.plan_round(ws, args)
        except loop.NothingToResume as nothing:
            print(nothing)
            return 0
        plan.record(actor())
        print(loop.outcome(_run(plan, args.quiet, args.verbose)))
    return 0


def _status(ws, as_json: bool) -> int:
    cur = ws.cursor()
    data = []
    for r in rounds.list_rounds(cur):
        steps = rounds.list_steps(cur, r["round_id"])
        data.append({
            "round_id": r["round_id"], "status": r["status"], "step": r["step"], "policy": r["policy_checkpoint_id"],
            "promoted": r["promoted"], "promote_reason": r["promote_reason"], "error": r["error"],
            "steps": [{"step": s["step"], "status": s["status"], "error": s["error"]} for s in steps],
            "evals": [{k: e[k] for k in ("judge", "wins", "losses", "ties", "n")} for e in rounds.list_evals(cur, r["round_id"])],
            "config_sources": _chosen(r["config"]),
        })
    if as_json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    for d in data:
        line = f"round {d['round_id']:>3}  {d['status']:<14} next step {d['step'] or '-':<9} policy {d['policy']}"
        if d["promoted"] is not None:
            line += f"  promoted={d['promoted']}"
        print(line)
        for e in d["evals"]:
            print(f"           eval by {e['judge']}: {e['wins']} wins, {e['losses']} losses, {e['ties']} ties of {e['n']}")
        if d["error"]:
            print(f"           error: {d['error']}")
        if d["config_sources"]:
            print("           config: " + ", ".join(f"{k} = {json.dumps(v['value'])} ({v['source']})"
                                                    for k, v in d["config_sources"].items()))
    return 0


def _chosen(saved: str | None) -> dict:
    """The round's settings that did not come from the defaults: key -> {value, source}."""
    from core.config import leaves

    saved_config = json.loads(saved) if saved else {}
    values = leaves(saved_config.get("resolved", {}))
    return {k: {"value": values.get(k), "source": src}
            for k, src in sorted(saved_config.get("sources", {}).items()) if src != "default"}
