"""The round state machine: generate -> judge -> review gate -> pairs -> train -> eval -> promote.

State lives in the database: ``rounds.step`` is the next step of a round and moves on only after a
step finished and its output was ingested, so ``resume`` after a crash re-runs the interrupted step
(every step is idempotent: generation only answers prompts without candidates, judging only judges
what is unjudged, pairs are replaced until frozen, training rebuilds its folder) and never a finished
one. ``run_rounds(ws, n)`` trains ``n`` rounds and then stops at the next round's review, so
reviewers always have fresh items; with review ``required`` it also stops at a gate whose quota is
not met, and a step that waits for something outside (``core.errors.Waiting``: a Gemini batch job) stops
the round with status ``waiting``; `round resume` runs that step again. A cancel request (a file in
``runs/``, so another process can ask) stops the running job.

``start_round`` / ``resume_round`` are the one place that says what `round start` and `round resume`
mean (recipe or override file, the round's saved config and loop count, the audit row); the CLI, the
studio's runner and a forwarded command make a ``RoundRun`` with them and only choose where it runs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from backend.job_runner import EventHandler
from backend.steps.generate import run_generate
from backend.steps.pairs import run_pairs
from backend.steps.train import run_train
from core import config as cfgmod
from core.errors import PrefloopError, UsageError, Waiting
from storage import rounds
from storage.workspace import Workspace

log = logging.getLogger(__name__)

ORDER = ("generate", "judge", "review", "pairs", "train", "eval", "promote")
CANCEL_FILE = "cancel.request"


class Cancelled(PrefloopError):
    """A `round cancel` request stopped the loop; `round resume` continues."""


class WaitingForReview(Exception):
    def __init__(self, message: str):
        super().__init__(message)


@dataclass
class LoopContext:
    ws: Workspace
    round_id: int
    on_event: EventHandler
    trained: int
    target: int
    summaries: dict = field(default_factory=dict)

    def cancel_requested(self) -> bool:
        return (self.ws.lay.runs / CANCEL_FILE).exists()

    def emit(self, **ev) -> None:
        self.on_event(ev)


StepFn = Callable[[LoopContext], dict | None]


def _generate(ctx: LoopContext) -> dict:
    return run_generate(ctx.ws, round_id=ctx.round_id, on_event=ctx.on_event, cancel=ctx.cancel_requested)


def _judge(ctx: LoopContext) -> dict:
    from backend.steps.judge import run_judge

    out = {}
    for name in ctx.ws.config.judges.default:
        out[name] = run_judge(ctx.ws, name, round_id=ctx.round_id, on_event=ctx.on_event)
    return out


def _review(ctx: LoopContext) -> dict:
    if ctx.trained >= ctx.target:
        raise WaitingForReview(f"round {ctx.round_id} is ready for review")
    review = ctx.ws.config.review
    done = rounds.labelled_prompts(ctx.ws.cursor(), ctx.round_id)
    if review.required == "required" and done < review.quota:
        raise WaitingForReview(f"round {ctx.round_id} waits for review: {done}/{review.quota} prompts labelled; "
                               "`prefloop round resume` continues once the quota is met")
    return {"labelled": done}


def _pairs(ctx: LoopContext) -> dict:
    from storage import pairs as pairstore

    if pairstore.is_frozen(ctx.ws.cursor(), ctx.round_id):
        return {"frozen": True}
    summary = run_pairs(ctx.ws)
    # stop here, saying which setting to change, rather than fail in train; steerlm trains on scored
    # candidates, not on pairs
    if summary["usable"] == 0 and ctx.ws.config.train.method != "steerlm":
        raise UsageError(summary["message"])
    return summary


def _train(ctx: LoopContext) -> dict:
    if rounds.get_checkpoint(ctx.ws.cursor(), f"c{ctx.round_id}") is not None:
        return {"already_trained": True}
    return run_train(ctx.ws, on_event=ctx.on_event, open_next=False, cancel=ctx.cancel_requested)


def _eval(ctx: LoopContext) -> dict:
    from backend.steps.evaluate import run_eval

    return run_eval(ctx.ws, ctx.round_id, on_event=ctx.on_event, cancel=ctx.cancel_requested)


def _promote(ctx: LoopContext) -> dict:
    cur = ctx.ws.cursor()
    policy = ctx.ws.config.round.promote
    evals = [e for e in rounds.list_evals(cur, ctx.round_id) if e["eval_set"] == "heldout"]
    if policy == "always":
        promoted, why = True, "promote = always"
    elif not evals:
        promoted, why = True, "if_not_worse: no eval ran (no eval judge or no held-out prompts)"
    else:
        e = evals[0]
        promoted = e["wins"] >= e["losses"]
        why = (f"if_not_worse: {e['wins']} wins, {e['losses']} losses, {e['ties']} ties vs "
               f"{e['baseline_checkpoint_id']} by {e['judge']}")
    rounds.set_round(cur, ctx.round_id, promoted=promoted, promote_reason=why)
    next_policy = f"c{ctx.round_id}" if promoted else rounds.last_promoted_checkpoint(cur, ctx.round_id)
    return {"promoted": promoted, "reason": why, "next_policy": next_policy}


STEPS: dict[str, StepFn] = {
    "generate": _generate, "judge": _judge, "review": _review, "pairs": _pairs,
    "train": _train, "eval": _eval, "promote": _promote,
}
assert tuple(STEPS) == ORDER


def _finish_round(ws: Workspace, round_id: int, next_policy: str) -> None:
    rounds.finish_round(ws.cursor(), round_id, next_policy, finished_at=_now())


def _now():
    import datetime

    return datetime.datetime.now()


def run_rounds(ws: Workspace, n: int = 1, *, on_event: EventHandler | None = None) -> dict:
    """Train ``n`` rounds from wherever the current round stands; stop at the next review.

    Returns {"trained": k, "stopped": reason, "round_id": r, "steps": {...}}. Raises Cancelled when a
    cancel request arrived, and the failing step's error otherwise (the round is marked failed and
    `resume` continues from that step).
    """
    if n < 1:
        raise UsageError("--rounds must be at least 1")
    on_event = on_event or (lambda e: None)
    cancel = ws.lay.runs / CANCEL_FILE
    cancel.unlink(missing_ok=True)
    trained = 0
    done_steps: list[str] = []
    while True:
        cur = ws.cursor()
        rnd = rounds.current_round(cur)
        r = rnd["round_id"]
        step = rnd["step"] if rnd["step"] in STEPS else "generate"
        ctx = LoopContext(ws, r, on_event, trained, n)
        rounds.set_round(cur, r, status="running", error=None, started_at=rnd["started_at"] or _now())
        try:
            for name in ORDER[ORDER.index(step):]:
                if ctx.cancel_requested():
                    raise Cancelled(f"round {r} cancelled before its {name} step; `prefloop round resume` continues")
                rounds.set_round(cur, r, step=name)
                on_event({"event": "step", "round_id": r, "step": name, "status": "running"})
                started = time.time()
                summary = STEPS[name](ctx) or {}
                ctx.summaries[name] = summary
                done_steps.append(f"r{r}:{name}")
                on_event({"event": "step", "round_id": r, "step": name, "status": "done",
                          "seconds": round(time.time() - started, 1), "summary": summary})
                nxt = ORDER.index(name) + 1
                rounds.set_round(cur, r, step=ORDER[nxt] if nxt < len(ORDER) else "done")
        except WaitingForReview as w:
            rounds.set_round(cur, r, status="waiting_review" if trained < n else "collecting", step="review")
            return {"trained": trained, "stopped": str(w), "round_id": r, "steps": done_steps}
        except Waiting as w:  # e.g. a Gemini batch job still running: the step runs again on resume
            rounds.set_round(cur, r, status=w.round_status)
            return {"trained": trained, "round_id": r, "steps": done_steps,
                    "stopped": f"round {r} waits for {w.what}; `prefloop round resume` picks the results up"}
        except Cancelled as c:
            rounds.set_round(cur, r, status="cancelled", error=str(c))
            (ws.lay.runs / CANCEL_FILE).unlink(missing_ok=True)
            raise
        except BaseException as err:
            if (ws.lay.runs / CANCEL_FILE).exists():
                (ws.lay.runs / CANCEL_FILE).unlink(missing_ok=True)
                rounds.set_round(cur, r, status="cancelled", error="cancelled by `prefloop round cancel`")
                raise Cancelled(f"round {r} cancelled during its {rounds.get_round(cur, r)['step']} step; "
                                "`prefloop round resume` continues") from None
            rounds.set_round(cur, r, status="failed", error=f"{type(err).__name__}: {err}"[:2000])
            raise
        _finish_round(ws, r, ctx.summaries["promote"]["next_policy"])
        trained += 1


def request_cancel(ws_root) -> None:
    """Ask the owner running a round to stop (works from another process: the owner polls the file)."""
    from storage.workspace import require_workspace

    lay = require_workspace(ws_root)
    lay.runs.mkdir(exist_ok=True)
    (lay.runs / CANCEL_FILE).write_text(str(time.time()))


# ------------------------------------------------------------------------------------ start and resume

RESUMABLE = ("failed", "cancelled", "waiting_review", Waiting.round_status)
"""Round statuses `round resume` continues from."""


class NothingToResume(PrefloopError):
    """`round resume` on a round that is not failed, cancelled or waiting (for review or a Gemini batch):
    nothing is wrong (the callers print the message and exit 0)."""

    exit_code = 0


@dataclass(frozen=True)
class RoundRun:
    """A `round start` or `round resume`, resolved and ready to run; the CLI, the studio's runner and a
    forwarded command all make it with ``start_round`` / ``resume_round`` and run it with ``run``."""

    ws: Workspace
    """The workspace, its ``config`` already what these rounds run with (overrides or the round's own)."""
    action: str
    """The audit action: ``round.start`` or ``round.resume``."""
    round_id: int
    """The current round when the run was asked for."""
    rounds: int
    """Rounds to train (at least 1)."""
    detail: dict = field(default_factory=dict)
    """Audit detail besides rounds and round_id (a start's recipe and override file)."""
    sources: dict = field(default_factory=dict)
    """Dotted config key -> where its value came from ("default", "recipe NAME", "prefloop.toml",
    "--config FILE", "--set"); saved with the round's resolved config."""

    @property
    def label(self) -> str:
        """What the studio calls the run: "round 3", "round 3 (+1 more)"."""
        return f"round {self.round_id}" + (f" (+{self.rounds - 1} more)" if self.rounds > 1 else "")

    def record(self, actor: str, via: str | None = None) -> None:
        """The audit row of this start or resume (``via``: "app" or "cli" when the studio runs it)."""
        from storage import audit

        detail = {"rounds": self.rounds, "round_id": self.round_id, **self.detail, **({"via": via} if via else {})}
        audit.record(self.ws.cursor(), actor, self.action, detail)

    def run(self, on_event: EventHandler | None = None) -> dict:
        """``run_rounds``, with the round's loop count and resolved config saved before and after, so a
        later `round resume` trains what is left with the same config. Returns run_rounds' result."""
        cur = self.ws.cursor()
        r = rounds.current_round(cur)["round_id"]
        saved = {"resolved": self.ws.config.model_dump(), "sources": self.sources}
        rounds.set_round(cur, r, config={"loop": {"remaining": self.rounds}, **saved})
        res = run_rounds(self.ws, self.rounds, on_event=on_event)
        cur = self.ws.cursor()
        now = rounds.current_round(cur)["round_id"]
        rounds.set_round(cur, now, config={"loop": {"remaining": max(self.rounds - res["trained"], 0)}, **saved})
        return res


def outcome(res: dict) -> str:
    """One line for a finished ``RoundRun.run``: "trained 1 round(s); round 2 is ready for review"."""
    return f"trained {res['trained']} round(s); {res['stopped']}"


def start_round(ws: Workspace, n: int = 1, *, recipe: str | None = None, config: Path | None = None,
                settings: list[str] | None = None, force: bool = False) -> RoundRun:
    """`round start`: train ``n`` rounds from where the current round stands. The config is resolved from
    the defaults, a packaged ``recipe`` (by name), prefloop.toml, an override file (``config``) and
    ``settings`` (``KEY=VALUE`` from ``--set``), each winning over the ones before it; the round keeps
    where every value came from (``RoundRun.sources``). The preflight checks (``backend.doctor``) run
    first: a failed one stops here, before any job, unless ``force``."""
    if n < 1:
        raise UsageError("--rounds must be at least 1")
    resolved, sources = resolve_config(ws, recipe, config, settings)
    preflight(ws, resolved, force)
    ws.config = resolved
    r = rounds.current_round(ws.cursor())["round_id"]
    return RoundRun(ws, "round.start", r, n, {"recipe": recipe, "config": str(config) if config else None,
                                               **({"set": list(settings)} if settings else {})}, sources)


def resume_round(ws: Workspace) -> RoundRun:
    """`round resume`: continue a failed, cancelled, waiting or review-gated round with its saved config, for
    the
    rounds its loop had left (at least 1). Raises NothingToResume for a round in any other state."""
    r = rounds.current_round(ws.cursor())
    saved = json.loads(r["config"]) if r["config"] else {}
    if r["status"] not in RESUMABLE:
        raise NothingToResume(f"nothing to resume: round {r['round_id']} is {r['status']}; "
                              "`prefloop round start` trains it")
    if saved.get("resolved"):
        ws.config = cfgmod.validate(saved["resolved"], f"round {r['round_id']} config")
    return RoundRun(ws, "round.resume", r["round_id"], max(saved.get("loop", {}).get("remaining", 1), 1),
                    sources=saved.get("sources", {}))


def plan_round(ws: Workspace, args) -> RoundRun:
    """``prefloop round start|resume`` as parsed (``args.action``, and start's ``rounds``, ``recipe``,
    ``config``), from the terminal or forwarded to the app; raises NothingToResume."""
    if args.action == "start":
        return start_round(ws, args.rounds if args.rounds is not None else default_rounds(args.recipe),
                           recipe=args.recipe, config=args.config, settings=getattr(args, "set", None),
                           force=getattr(args, "force", False))
    return resume_round(ws)


def preflight(ws: Workspace, config: cfgmod.WorkspaceConfig, force: bool) -> None:
    """``prefloop doctor``'s checks for this run (GPU memory only when a GPU is seen); a UsageError
    listing the failed ones unless ``force``."""
    from backend import doctor

    checks = doctor.run_checks(doctor.context_for(ws, config, estimate_on_cpu=False))
    failed = doctor.failed(checks)
    for check in checks:
        log.info("preflight %s: %s %s", check.name, check.status, check.found)
    if failed and not force:
        raise UsageError("preflight checks failed (`prefloop doctor` shows them all; `round start --force` runs "
                         "anyway):\n" + doctor.table(failed))
    if failed:
        log.warning("round start --force: running despite %d failed preflight check(s)", len(failed))


def default_rounds(recipe: str | None) -> int:
    """Rounds `round start` trains without ``--rounds``: the recipe's (its paper's), else 1."""
    if not recipe:
        return 1
    from backend import recipes

    loaded = recipes.load(recipe)
    return loaded.meta.default_rounds if loaded.meta else 1


def resolve_config(ws: Workspace, recipe: str | None = None, config: Path | None = None,
                   settings: list[str] | None = None) -> tuple[cfgmod.WorkspaceConfig, dict[str, str]]:
    """The config these rounds run with, and the source of every value. Precedence, lowest first: the
    defaults, the recipe, prefloop.toml (only the keys it sets), the ``--config`` file, ``--set``. A
    recipe's ``[tiny]`` table applies on a tiny policy, and on a real policy every model the recipe needs
    must be a real model. Everything is validated; an unknown key is named with its source."""
    from backend import recipes

    file_values = cfgmod.explicit(cfgmod.load(ws.lay.config))
    policy = file_values.get("policy", {}).get("model", cfgmod.PolicyConfig().model)
    layers: list[tuple[str, dict]] = []
    loaded = recipes.load(recipe) if recipe else None
    if loaded is not None:
        layers.append((f"recipe {loaded.name}", loaded.overrides_for(policy)))
    layers.append((cfgmod.CONFIG_NAME, file_values))
    if config is not None:
        layers.append((f"--config {config}", recipes.load_file(config, require_meta=False).overrides_for(policy)))
    if settings:
        layers.append(("--set", parse_settings(settings)))
    resolved, sources = cfgmod.resolve(layers)
    if loaded is not None:
        loaded.check_models(resolved)
    return resolved, sources


def parse_settings(settings: list[str]) -> dict:
    """``["train.beta=0.2", 'generation.views=["original"]']`` -> nested values (each VALUE read as TOML,
    else as a string); a UsageError for an item without ``=``."""
    import tomllib

    out: dict = {}
    for item in settings:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.beta=0.2")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out
