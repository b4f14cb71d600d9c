"""prefloop round start|resume|status|cancel: the iterative loop as a resumable state machine."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from app.commands._ws import actor, workspace_for
from app.progress import TerminalEvents
from backend import loop
from core import config as cfgmod
from storage import audit, rounds


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = sub.add_parser("start", help="train N rounds from where the current round stands, then stop at the "
                                     "next round's review")
    s.add_argument("--rounds", type=int, default=1, help="rounds to train (default 1)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--recipe", help="a packaged recipe by name (backend/recipes/NAME.toml)")
    g.add_argument("--config", type=Path, help="a TOML file of config overrides for these rounds")
    s.add_argument("--quiet", action="store_true", help="no progress output")
    r = sub.add_parser("resume", help="continue after a crash, a cancel or a review gate")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    st = sub.add_parser("status", help="the rounds, their steps and the current state")
    st.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser("cancel", help="stop the running round's job (works from another terminal)")
    for sp in sub.choices.values():  # `prefloop round start -w DIR` as well as `prefloop round -w DIR start`
        sp.add_argument("-w", "--workspace", default=argparse.SUPPRESS, help="workspace folder")
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug messages")


def load_overrides(recipe: str | None, config: Path | None, base: cfgmod.WorkspaceConfig | None = None) -> dict:
    """The config overrides of a packaged recipe (by name) or of an override file (``--config``).

    Both go through ``backend.recipes``: validated on load (an unknown key is named), the ``[recipe]``
    metadata dropped, and the ``[tiny]`` table applied when the policy model of ``base`` (the workspace
    config) is ``tiny``; on a real policy model a recipe also checks the models it needs are real.
    """
    from backend import recipes

    if recipe:
        loaded = recipes.load(recipe)
    elif config is not None:
        loaded = recipes.load_file(config, require_meta=False)
    else:
        return {}
    base = base or cfgmod.WorkspaceConfig()
    return loaded.resolve(base)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def apply_overrides(ws, overrides: dict, source: str) -> None:
    if overrides:
        ws.config = cfgmod.validate(_merge(ws.config.model_dump(), overrides), source)


def _print_result(res: dict) -> None:
    print(f"trained {res['trained']} round(s); {res['stopped']}")


def _run(ws, n: int, quiet: bool, verbose: bool) -> dict:
    def show_steps(ev, inner):
        if ev.get("event") == "step" and not quiet:
            extra = f" ({ev['seconds']} s)" if ev.get("status") == "done" else ""
            print(f"round {ev['round_id']}: {ev['step']} {ev['status']}{extra}", flush=True)
        inner(ev)

    with TerminalEvents("round", verbose=verbose, quiet=quiet) as events:
        cur = ws.cursor()
        r = rounds.current_round(cur)
        rounds.set_round(cur, r["round_id"], config={"loop": {"remaining": n}, "resolved": ws.config.model_dump()})
        res = loop.run_rounds(ws, n, on_event=lambda ev: show_steps(ev, events))
        cur2 = ws.cursor()
        now = rounds.current_round(cur2)
        remaining = max(n - res["trained"], 0)
        rounds.set_round(cur2, now["round_id"], config={"loop": {"remaining": remaining},
                                                        "resolved": ws.config.model_dump()})
    return res


def run(args: argparse.Namespace) -> int:
    if args.action == "cancel":
        loop.request_cancel(args.workspace)
        print("cancel requested: the owner stops the running job; `prefloop round resume` continues later")
        return 0
    with workspace_for(args, f"prefloop round {args.action}") as ws:
        cur = ws.cursor()
        if args.action == "status":
            return _status(ws, args.json)
        if args.action == "start":
            apply_overrides(ws, load_overrides(args.recipe, args.config, ws.config),
                            args.recipe or str(args.config))
            audit.record(cur, actor(), "round.start", {"rounds": args.rounds, "recipe": args.recipe})
            _print_result(_run(ws, args.rounds, args.quiet, args.verbose))
            return 0
        r = rounds.current_round(cur)
        cfg = json.loads(r["config"]) if r["config"] else {}
        remaining = cfg.get("loop", {}).get("remaining", 1)
        if r["status"] not in ("failed", "cancelled", "waiting_review"):
            print(f"nothing to resume: round {r['round_id']} is {r['status']}; `prefloop round start` trains it")
            return 0
        if cfg.get("resolved"):
            ws.config = cfgmod.validate(cfg["resolved"], f"round {r['round_id']} config")
        audit.record(cur, actor(), "round.resume", {"round_id": r["round_id"]})
        _print_result(_run(ws, max(remaining, 1), args.quiet, args.verbose))
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
    return 0
