"""The Rounds tab (admin): the current round, Start round / Cancel, live progress, and per-round results
(the training method, pairs by source, training curves, eval).

Handlers are plain functions (``status``, ``start``, ``cancel``, ``details``) that check the admin role
first; the tab wires them to buttons and to a ``gr.Timer`` that polls the app's runner about once a
second (only for admins: the timer is switched on at page load by role). The per-round results (pairs
by source, training curves, eval against the previous checkpoint) are reloaded when a run finishes,
when another round is picked, or on Reload — not on every tick.
"""

from __future__ import annotations

import html

import gradio as gr
import pandas as pd

from app.server import AppContext
from app.server.auth import as_gr_error, require, user_of
from app.server.runner import cancel_round, start_round, studio_of
from backend.loop import ORDER
from core import names
from core.errors import UsageError
from storage import pairs as pairs_db
from storage import rounds
from storage import users as users_db

LOG_SHOWN = 14
CURVES = {"loss": "loss", "margin": "reward margin", "accuracy": "reward accuracy"}
"""train_metrics column -> title of its training plot (one LinePlot each)."""
CURVE_COLUMNS = ["step", *CURVES]
EVAL_HEADERS = ["judge", "baseline", "checkpoint", "wins", "losses", "ties", "n"]


def esc(v: object) -> str:
    return "" if v is None else html.escape(str(v), quote=True)


# ---------------------------------------------------------------------------------------------- handlers

def is_admin(ctx: AppContext, user: str | None) -> bool:
    """Whether the signed-in user is an admin (no refusal recorded: used to switch the poll timer on)."""
    if not user:
        return False
    with ctx.cursor() as cur:
        u = users_db.get_user(cur, user)
    return u is not None and users_db.role_allows(u.role, "admin")


def status(ctx: AppContext, user: str | None) -> dict:
    """The current round (state, step, its steps so far) and the runner's latest run."""
    require(ctx, user, "admin", "the Rounds tab")
    with ctx.cursor() as cur:
        r = rounds.current_round(cur)
        steps = rounds.list_steps(cur, r["round_id"])
    return {"round": {k: r[k] for k in ("round_id", "status", "step", "policy_checkpoint_id", "error")},
            "steps": [{k: s[k] for k in ("step", "status", "error")} for s in steps],
            "run": studio_of(ctx).runner.snapshot()}


def start(ctx: AppContext, user: str | None) -> str:
    """Start one round (pairs -> train -> eval of this round, then generate -> judge of the next) in the background."""
    who = require(ctx, user, "admin", "starting a round")
    run = start_round(studio_of(ctx), who.name)
    return f"{run['label']} started by {who.name}; progress below"


def cancel(ctx: AppContext, user: str | None) -> str:
    """Ask the running round to stop (its job is terminated; the round can be resumed)."""
    who = require(ctx, user, "admin", "cancelling a round")
    return cancel_round(studio_of(ctx), who.name)


def default_round(cur) -> int:
    """The newest round with training metrics, else the current round."""
    listed = rounds.list_rounds(cur)
    for r in reversed(listed):
        if rounds.train_metrics(cur, r["round_id"]):
            return r["round_id"]
    return rounds.current_round(cur)["round_id"]


def curve_frame(metrics: list[dict]) -> pd.DataFrame:
    """train_metrics rows -> (step, loss, margin, accuracy), numeric, for the training plots."""
    rows = [{"step": int(m["step"]), **{c: m.get(c) for c in CURVES}} for m in metrics]
    return pd.DataFrame(rows, columns=CURVE_COLUMNS).astype({"step": "int64", **{c: "float64" for c in CURVES}})


def method_text(method: str | None, configured: str) -> str:
    """The round's training method as the tab shows it (``configured``: the workspace's train.method, for a
    round that neither trained nor was started with a config)."""
    if method is None:
        return f"training method: not trained yet (train.method = `{configured}`)"
    return f"training method: **{method}**: {names.TRAIN_METHODS.get(method, '')}"


def details(ctx: AppContext, user: str | None, round_id: int | str | None = None) -> dict:
    """One round's results: its training method, pairs by source, training curves, eval wins/losses/ties vs the
    previous checkpoint."""
    require(ctx, user, "admin", "round results")
    with ctx.cursor() as cur:
        choices = [r["round_id"] for r in rounds.list_rounds(cur)]
        try:
            rid = int(round_id) if round_id not in (None, "") else default_round(cur)
        except (TypeError, ValueError):
            raise UsageError(f"round {round_id!r} is not a round number") from None
        if rounds.get_round(cur, rid) is None:
            raise UsageError(f"round {rid} does not exist in this workspace")
        by_source = pairs_db.counts_by_source(cur, rid)
        metrics = rounds.train_metrics(cur, rid)
        evals = rounds.list_evals(cur, rid)
        method = rounds.training_method(cur, rid)
    return {
        "round_id": rid, "choices": choices, "method": method,
        "method_text": method_text(method, ctx.ws.config.train.method),
        "pairs": pd.DataFrame([[s, n] for s, n in by_source.items()] or [], columns=["source", "pairs"]),
        "curve": curve_frame(metrics),
        "evals": pd.DataFrame([[e["judge"], e["baseline_checkpoint_id"], e["checkpoint_id"], e["wins"], e["losses"],
                                e["ties"], e["n"]] for e in evals], columns=EVAL_HEADERS),
    }


# ---------------------------------------------------------------------------------------------- rendering

def status_html(st: dict) -> str:
    r = st["round"]
    steps = " → ".join(f"{esc(s['step'])} <i>{esc(s['status'])}</i>" for s in st["steps"]) or "no step yet"
    err = f'<div class="pf-round-error">error: {esc(r["error"])}</div>' if r.get("error") else ""
    return (f'<div id="pf-round-state"><b>round {esc(r["round_id"])}</b> · state <b>{esc(r["status"])}</b> · '
            f'next step <b>{esc(r["step"] or "-")}</b> · policy {esc(r["policy_checkpoint_id"])}'
            f'<div class="pf-round-steps">{steps}</div>{err}</div>')


def progress_html(run: dict | None) -> str:
    """The runner's latest run: who started it, its state, where it is (step k of 7 for a round) and a bar."""
    if run is None:
        return '<div class="pf-run">nothing has run in this app yet</div>'
    running = run["status"] == "running"
    inner = 0.0
    if run["progress"] and run["progress"][1]:
        inner = min(1.0, run["progress"][0] / run["progress"][1])
    frac, where = inner, ""
    if run["kind"] == "round" and run["step"] in ORDER:
        i = ORDER.index(run["step"])
        frac = (i + inner) / len(ORDER)
        stage = "step" if running else "stopped at step"
        where = f" · {stage} {i + 1} of {len(ORDER)}: {esc(run['step'])} (round {esc(run['round_id'])})"
    if run["status"] == "done":
        frac, where = 1.0, ""
    count = ""
    if run["progress"] and running:
        done, total, unit = run["progress"]
        count = f" · {done}/{total} {esc(unit)}"
    msg = f'<div class="pf-run-message">{esc(run["message"])}</div>' if run["message"] else ""
    return (f'<div class="pf-run" data-status="{esc(run["status"])}"><b>{esc(run["label"])}</b> '
            f'({esc(run["kind"])}, by {esc(run["user"])}): <b class="pf-run-status">{esc(run["status"])}</b> '
            f'after {esc(run["seconds"])} s{where}{count}'
            f'<div><progress class="pf-run-bar" max="1" value="{frac:.3f}"></progress> {frac * 100:.0f}%</div>{msg}</div>')


def log_text(run: dict | None) -> str:
    return "\n".join(run["lines"][-LOG_SHOWN:]) if run else ""


def run_key(run: dict | None):
    return None if run is None else (run["run_id"], run["status"])


# ---------------------------------------------------------------------------------------------- the tab

def build(ctx: AppContext, demo: gr.Blocks) -> None:
    """The Rounds tab (role: admin)."""
    state_box = gr.HTML(elem_id="pf-round-status")
    with gr.Row():
        start_btn = gr.Button("Start round", variant="primary", elem_id="pf-round-start")
        cancel_btn = gr.Button("Cancel", variant="stop", elem_id="pf-round-cancel")
    message = gr.Markdown(elem_id="pf-round-message")
    progress = gr.HTML(elem_id="pf-round-progress")
    log_box = gr.Textbox(label="log (last lines)", lines=8, max_lines=LOG_SHOWN, interactive=False,
                         elem_id="pf-round-log")
    with gr.Row():
        pick = gr.Dropdown(choices=[], label="round", allow_custom_value=True, elem_id="pf-round-pick", scale=1)
        reload_btn = gr.Button("Reload results", elem_id="pf-round-reload", scale=0)
    with gr.Row():
        pairs_df = gr.Dataframe(headers=["source", "pairs"], label="pairs by source", interactive=False,
                                elem_id="pf-round-pairs")
        evals_df = gr.Dataframe(headers=EVAL_HEADERS, label="eval vs the previous checkpoint", interactive=False,
                                elem_id="pf-round-evals")
    method_md = gr.Markdown(elem_id="pf-round-method")
    with gr.Row(elem_id="pf-train-curve"):  # one plot per metric (no colour legend: its domain would stay empty)
        curves = [gr.LinePlot(curve_frame([]), x="step", y=col, title=f"training {name}", height=260,
                              elem_id=f"pf-train-{col}") for col, name in CURVES.items()]
    timer = gr.Timer(1.0, active=False)
    seen = gr.State("init")  # the (run id, status) last shown; results reload when it changes

    def show_details(d: dict) -> dict:
        """``details`` -> the round picker, the two tables and every training plot."""
        return {pick: gr.Dropdown(choices=d["choices"], value=d["round_id"]), pairs_df: d["pairs"],
                evals_df: d["evals"], **{plot: d["curve"] for plot in curves}, method_md: d["method_text"]}

    def on_load(request: gr.Request):
        return gr.Timer(active=is_admin(ctx, user_of(request)))

    def on_tick(seen_, picked, request: gr.Request):
        user = user_of(request)
        st = as_gr_error(status, ctx, user)
        key = run_key(st["run"])
        shown = {state_box: status_html(st), progress: progress_html(st["run"]), log_box: log_text(st["run"]),
                 seen: key}
        if key != seen_:  # first tick, or a run started/finished: reload the results (the newest trained round)
            keep = key is not None and key[1] == "running" and seen_ != "init"
            shown |= show_details(as_gr_error(details, ctx, user, picked if keep else None))
        return shown  # without the results, they stay as they are

    def on_start(request: gr.Request):
        return as_gr_error(start, ctx, user_of(request))

    def on_cancel(request: gr.Request):
        return as_gr_error(cancel, ctx, user_of(request))

    def on_pick(picked, request: gr.Request):
        return show_details(as_gr_error(details, ctx, user_of(request), picked))

    lim = {"concurrency_limit": ctx.concurrency}
    results = [pick, pairs_df, evals_df, *curves, method_md]  # output lists keep the order API clients see
    demo.load(on_load, None, timer, api_visibility="private")
    timer.tick(on_tick, [seen, pick], [state_box, progress, log_box, seen, *results], api_name="rounds_status",
               show_progress="hidden", **lim)
    start_btn.click(on_start, None, message, api_name="start_round", **lim)
    cancel_btn.click(on_cancel, None, message, api_name="cancel_round", **lim)
    reload_btn.click(on_pick, pick, results, api_name="round_details", **lim)
    pick.input(on_pick, pick, results, api_name="round_details_pick", api_visibility="undocumented", **lim)

