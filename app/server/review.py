"""The review screen: handlers (plain functions tests call directly) and the Gradio tab that wires them.

Every handler takes the ``AppContext``, the signed-in user name (``gr.Request.username``; None when
unauthenticated) and the ``Session`` (``app.server.session``, kept in ``gr.State``), checks the role
first, and returns a ``View`` (what the screen shows next, with the new session). The session holds the
item on screen (round, prompt, candidate ids in display order, the AI pair, when it was served) and the
label ids submitted in this session (for undo). Persistent state is in DuckDB only. The tab's wiring
maps a ``View`` to its components in one place (``build``'s ``show``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import gradio as gr

from app.server import IDLE_CAP_S, AppContext, render
from app.server.auth import as_gr_error, require, user_of
from app.server.queue_cache import claim_next
from app.server.session import DayCounts, OnScreen, Session
from backend import pairs as pair_rules
from core.errors import UsageError
from storage import audit, claims, labels, review_items, review_queue, rounds

log = logging.getLogger(__name__)

SKIP_REASONS = ["not sure", "image unclear", "question unanswerable", "needs an expert", "other"]
HISTORY = 50


@dataclass(frozen=True)
class View:
    """What the review screen shows after a handler ran."""

    html: str
    """the item (image, question, answers with their scores) or the empty-queue message"""
    k: int = 0
    """how many answers are on screen (the chosen/rejected choices are 1-k); 0 without an item"""
    progress: str = ""
    """the progress line (round and today's counters)"""
    state: Session = field(default_factory=Session)
    """the session after this handler: the wiring stores it back in ``gr.State``"""
    message: str = ""
    """a short toast ("saved (pair) for prompt p2"); empty for none"""


# ---------------------------------------------------------------------------------------------- the item

def judge_scores(item: dict) -> dict[str, dict[str, render.JudgeScores]]:
    """{candidate_id: {judge: JudgeScores}} from ``storage.review_items.review_item`` rows."""
    out: dict[str, dict[str, render.JudgeScores]] = {}
    for j in item["judgments"]:
        out.setdefault(j["candidate_id"], {})[j["judge"]] = render.JudgeScores(
            judge=j["judge"], overall=j["overall"], score=j["score"], reasoning=j["reasoning"],
            metrics={m: j[m] for m in render.METRICS})
    for v in item["pairwise"]:
        for cid, won in ((v["first_id"], "first"), (v["second_id"], "second")):
            s = out.setdefault(cid, {}).setdefault(v["judge"], render.JudgeScores(judge=v["judge"]))
            s.pairwise = True
            if v["winner"] == "tie":
                s.ties += 1
            elif v["winner"] == won:
                s.wins += 1
            else:
                s.losses += 1
    return out


def ai_pair(candidates: list[dict], scores: dict[str, dict[str, render.JudgeScores]],
            preferred: str | None) -> dict | None:
    """The pair the AI would build (best vs worst by `overall`, ``backend.pairs.best_worst``).

    The judge is ``pairs.judge`` from the config when it scored two answers, else the alphabetically
    first judge that did (the same rule as the margin queue order).
    """
    by_judge: dict[str, int] = {}
    for cid in (c["candidate_id"] for c in candidates):
        for judge, s in scores.get(cid, {}).items():
            if s.overall is not None:
                by_judge[judge] = by_judge.get(judge, 0) + 1
    usable = sorted(j for j, n in by_judge.items() if n >= 2)
    if not usable:
        return None
    judge = preferred if preferred in usable else usable[0]
    item = pair_rules.PromptItem(prompt_id="", candidates=tuple(
        pair_rules.Candidate(candidate_id=c["candidate_id"], text=c["text"], origin=c["origin"], view=c["view"],
                             sample_index=c["sample_index"],
                             scores={j: {"overall": s.overall} for j, s in scores.get(c["candidate_id"], {}).items()})
        for c in candidates))
    try:
        (p,) = pair_rules.best_worst(item, pair_rules.PairOptions(judge=judge, score="overall"), None)
    except pair_rules.Skip:
        return None
    ids = [c["candidate_id"] for c in candidates]
    return {"judge": judge, "chosen_id": p.chosen_id, "rejected_id": p.rejected_id, "margin": p.margin,
            "chosen_index": ids.index(p.chosen_id), "rejected_index": ids.index(p.rejected_id)}


def _image_src(ctx: AppContext, rel: str | None) -> str | None:
    if not rel:
        return None
    path = (ctx.ws.root / rel).resolve()
    if not path.is_relative_to(ctx.ws.lay.images.resolve()):
        log.warning("image path %s is outside the image store; not shown", rel)
        return None
    return render.image_url(str(path))


def _progress(ctx: AppContext, cur, user: str, role: str, round_id: int | None, day: DayCounts) -> str:
    overlap = ctx.review.overlap
    rnd = ctx.cached(("round", round_id, overlap),
                     lambda: review_items.round_progress(cur, round_id, overlap, ctx.clock())) if round_id else {}
    return render.progress_html(user, role, rnd, day)


def _day(cur, user: str, state: Session) -> DayCounts:
    """Today's counters: read once per session, then kept up to date in the session state."""
    return state.day or DayCounts.from_row(review_items.annotator_day(cur, user))


def _serve(ctx: AppContext, cur, round_id: int, prompt_id: str, session: Session, note: str | None = None) -> View:
    """Show one item; the view's session is ``session`` with this item on screen."""
    item = review_items.review_item(cur, round_id, prompt_id)
    if item is None:
        raise UsageError(f"prompt {prompt_id} no longer exists; press Next")
    scores = judge_scores(item)
    pair = ai_pair(item["candidates"], scores, ctx.ws.config.pairs.judge)
    p = item["prompt"]
    html_ = render.item_html(question=p["question"], image_src=_image_src(ctx, p["image_path"]),
                             candidates=item["candidates"], scores=scores, ai_pair=pair, demo_model=ctx.demo_model,
                             reference=p["reference"], round_id=round_id, prompt_id=prompt_id, note=note)
    shown = OnScreen(round_id=round_id, prompt_id=prompt_id,
                     candidate_ids=tuple(c["candidate_id"] for c in item["candidates"]), ai_pair=pair,
                     served_at=ctx.clock().timestamp())
    return View(html_, k=len(item["candidates"]), state=replace(session, item=shown))


def _round_id(cur) -> int:
    round_id = rounds.current_round_id(cur)
    if round_id is None:
        raise UsageError("the workspace has no round yet; create it with `prefloop init` or start one")
    return round_id


def _next(ctx: AppContext, cur, user: str, role: str, session: Session, note: str | None = None) -> View:
    """Claim and show the next item. An item this user already holds comes first: always on a fresh
    session (``session.parked`` None: a reload or a second tab), else only while an undo left one parked."""
    round_id = _round_id(cur)
    cfg = ctx.review
    prompt_id, parked = None, session.parked
    if parked is None or parked > 0:
        held = claims.live_claim(cur, user, ctx.clock(), round_id)
        prompt_id = held["prompt_id"] if held else None
        parked = max(0, (parked or 0) - 1) if held else 0
    if prompt_id is None:
        prompt_id = claim_next(cur, round_id, user, order=cfg.queue_order, overlap=cfg.overlap,
                               claim_minutes=cfg.claim_minutes, now=ctx.clock(), cache=ctx.queue,
                               resume=False)
    if prompt_id is None:
        empty = (f"Nothing to review in round {round_id} right now: every queued prompt is labelled or being "
                 "reviewed by someone else. Check back later.")
        view = View(render.empty_html(f"{note} {empty}" if note else empty, ctx.demo_model),
                    state=replace(session, item=None))
    else:
        view = _serve(ctx, cur, round_id, prompt_id, session, note)
    return replace(view, state=replace(view.state, parked=parked), message=note or "",
                   progress=_progress(ctx, cur, user, role, round_id, session.day))


# ---------------------------------------------------------------------------------------------- handlers

def next_item(ctx: AppContext, user: str | None, state: Session | None) -> View:
    """Show the item on screen again if it is still ours, else claim the next one in queue order."""
    who = require(ctx, user, "annotator", "reviewing")
    state = state or Session()
    item = state.item
    with ctx.cursor() as cur:
        fresh = Session(history=state.history, day=_day(cur, who.name, state))  # a held item comes first
        if item:
            held = claims.live_claim(cur, who.name, ctx.clock(), item.round_id)
            if held is not None and held["prompt_id"] == item.prompt_id:
                view = _serve(ctx, cur, item.round_id, item.prompt_id, fresh)
                return replace(view, progress=_progress(ctx, cur, who.name, who.role, item.round_id, fresh.day))
        return _next(ctx, cur, who.name, who.role, fresh)


def _parse_index(value, k: int, what: str) -> int | None:
    if value is None or str(value).strip() == "":
        return None
    try:
        i = int(str(value).strip().lstrip("#"))
    except ValueError:
        raise UsageError(f"{what}: {value!r} is not an answer number (1-{k})") from None
    if not 1 <= i <= k:
        raise UsageError(f"{what}: answer #{i} does not exist; pick 1-{k}")
    return i - 1


def parse_ranking(text: str | None, k: int) -> list[int] | None:
    """'3 1 5 2 4', '3,1,5,2,4' or '31524' (k <= 9) -> 0-based indices, best first; must rank all k."""
    if not text or not text.strip():
        return None
    tokens = re.findall(r"\d+", text)
    if len(tokens) == 1 and k <= 9 and len(tokens[0]) == k:
        tokens = list(tokens[0])
    order = [int(t) for t in tokens]
    if sorted(order) != list(range(1, k + 1)):
        raise UsageError(f"ranking {text!r}: list every answer 1-{k} exactly once, best first (e.g. "
                         f"{' '.join(str(i) for i in range(k, 0, -1))})")
    return [i - 1 for i in order]


def _active_seconds(ctx: AppContext, item: OnScreen, client_value) -> float:
    """The browser's active-time count (idle gaps over IDLE_CAP_S not counted), capped by the wall time since
    the item was served; without one (an API client), the wall time capped at IDLE_CAP_S."""
    elapsed = max(0.0, ctx.clock().timestamp() - float(item.served_at or 0))
    try:
        v = float(client_value) if client_value is not None and client_value != "" else None
    except (TypeError, ValueError):
        v = None
    if v is None or v < 0:
        return round(min(elapsed, IDLE_CAP_S), 1)
    return round(min(v, elapsed), 1)


def _record(ctx: AppContext, user: str | None, state: Session | None,
            make_decision: Callable[[OnScreen], labels.Decision]) -> View:
    who = require(ctx, user, "annotator", "labelling")
    state = state or Session()
    item = state.item
    if not item:
        raise UsageError("nothing to submit: no item is on screen; press Next")
    decision = make_decision(item)
    cfg = ctx.review
    with ctx.cursor() as cur:
        res = labels.submit_label(cur, round_id=item.round_id, prompt_id=item.prompt_id, annotator=who.name,
                                  decision=decision, overlap=cfg.overlap, now=ctx.clock(),
                                  claim_minutes=cfg.claim_minutes)
        history = (*state.history, res["label_id"])[-HISTORY:]
        day = _day(cur, who.name, state).add(decision.kind, decision.active_seconds)
        saved = f"saved ({decision.kind}) for prompt {item.prompt_id}"
        warn = None if res["held_claim"] else (f"Your claim on prompt {item.prompt_id} had expired and someone "
                                               "else took it; your label is kept all the same.")
        view = _next(ctx, cur, who.name, who.role, replace(state, history=history, day=day), warn)
        return replace(view, message=saved + (" (your claim had expired)" if warn else ""))


def submit(ctx: AppContext, user: str | None, state: Session | None, chosen=None, rejected=None,
           ranking: str | None = None, all_bad: bool = False, comment: str | None = None, active_seconds=None) -> View:
    """Record the annotator's decision (a chosen/rejected pair, a full ranking, or all bad) and serve the next item."""
    def make(item: OnScreen) -> labels.Decision:
        ids, k = item.candidate_ids, len(item.candidate_ids)
        extra = {"comment": (comment or "").strip() or None, "active_seconds": _active_seconds(ctx, item, active_seconds)}
        if all_bad:
            return labels.Decision(all_bad=True, **extra)
        order = parse_ranking(ranking, k)
        if order is not None:
            return labels.Decision(chosen_id=ids[order[0]], rejected_id=ids[order[-1]],
                                   ranking=tuple(ids[i] for i in order), **extra)
        c, r = _parse_index(chosen, k, "chosen"), _parse_index(rejected, k, "rejected")
        if c is None or r is None:
            raise UsageError(f"pick a chosen (1-{k}) and a rejected (Shift+1-{k}) answer, or confirm the AI pair (A), "
                             "rank all answers, mark all bad (X), or skip (S)")
        if c == r:
            raise UsageError(f"chosen and rejected are both #{c + 1}; pick two different answers")
        return labels.Decision(chosen_id=ids[c], rejected_id=ids[r], **extra)
    return _record(ctx, user, state, make)


def confirm_ai(ctx: AppContext, user: str | None, state: Session | None, comment: str | None = None,
               active_seconds=None) -> View:
    """Accept the AI pair shown on screen as the human decision."""
    def make(item: OnScreen) -> labels.Decision:
        pair = item.ai_pair
        if not pair:
            raise UsageError("this item has no AI pair to confirm; pick chosen and rejected yourself")
        return labels.Decision(chosen_id=pair["chosen_id"], rejected_id=pair["rejected_id"],
                               comment=(comment or "").strip() or None,
                               active_seconds=_active_seconds(ctx, item, active_seconds))
    return _record(ctx, user, state, make)


def skip(ctx: AppContext, user: str | None, state: Session | None, reason: str | None = None,
         comment: str | None = None, active_seconds=None) -> View:
    """Skip the item with a reason; its slot goes back to the queue for someone else."""
    def make(item: OnScreen) -> labels.Decision:
        why = (reason or "").strip()
        if not why:
            raise UsageError(f"give a reason to skip (e.g. {', '.join(SKIP_REASONS[:3])})")
        return labels.Decision(skipped_reason=why[:500], comment=(comment or "").strip() or None,
                               active_seconds=_active_seconds(ctx, item, active_seconds))
    return _record(ctx, user, state, make)


def undo(ctx: AppContext, user: str | None, state: Session | None) -> View:
    """Undo this session's last submission (an appended 'undo' row) and show that item again."""
    who = require(ctx, user, "annotator", "undo")
    state = state or Session()
    if not state.history:
        raise UsageError("nothing to undo in this session")
    *history, label_id = state.history
    cfg = ctx.review
    with ctx.cursor() as cur:
        try:
            res = labels.undo_label(cur, label_id, who.name, overlap=cfg.overlap, now=ctx.clock(),
                                    claim_minutes=cfg.claim_minutes)
        except labels.UndoRefused as err:
            raise UsageError(str(err)) from None
        ctx.queue.forget(res["round_id"])
        day = DayCounts.from_row(review_items.annotator_day(cur, who.name))
        # the item that was on screen stays claimed: it is served again after this one
        parked = (state.parked or 0) + (1 if state.item else 0)
        session = Session(history=tuple(history), day=day, parked=parked)
        view = _serve(ctx, cur, res["round_id"], res["prompt_id"], session,
                      note=f"undid your label on prompt {res['prompt_id']}; decide again")
        return replace(view, progress=_progress(ctx, cur, who.name, who.role, res["round_id"], day), message="undone")


def refresh_queue(ctx: AppContext, user: str | None) -> str:
    """Admin: recompute the current round's queue priorities (after ingesting new judgments)."""
    who = require(ctx, user, "admin", "recomputing the review queue")
    with ctx.cursor() as cur:
        round_id = _round_id(cur)
        n = review_queue.refresh_queue(cur, round_id, judge=ctx.ws.config.pairs.judge)
        audit.record(cur, who.name, "refresh_queue", {"round_id": round_id, "prompts": n})
    ctx.queue.forget(round_id)
    return f"round {round_id}: {n} prompts queued (orders: {', '.join(review_queue.QUEUE_ORDERS)})"


def whoami(ctx: AppContext, user: str | None) -> dict:
    """{name, role} of the signed-in user (any role)."""
    who = require(ctx, user, "annotator", "using the studio")
    return {"name": who.name, "role": who.role}


# ---------------------------------------------------------------------------------------------- the tab

_ACTIVE_JS = "(...a) => { a[a.length - 1] = window.pfTakeActive ? window.pfTakeActive() : null; return a; }"


def build(ctx: AppContext, demo: gr.Blocks) -> None:
    """The Review tab (role: annotator). Admins also see the queue controls."""
    progress = gr.HTML(elem_id="pf-progress")
    item = gr.HTML(render.empty_html("Loading…"), elem_id="pf-item-html")
    with gr.Row(equal_height=True):
        chosen = gr.Radio([], label="chosen (1-k)", elem_id="pf-chosen", scale=2)
        rejected = gr.Radio([], label="rejected (Shift+1-k)", elem_id="pf-rejected", scale=2)
        all_bad = gr.Checkbox(label="all bad (X)", elem_id="pf-allbad", scale=1)
    with gr.Row():
        ranking = gr.Textbox(label="or rank all, best first (e.g. 3 1 5 2 4)", elem_id="pf-ranking", scale=2)
        comment = gr.Textbox(label="comment (optional)", elem_id="pf-comment", scale=2)
        reason = gr.Dropdown(SKIP_REASONS, value=SKIP_REASONS[0], allow_custom_value=True, label="skip reason",
                             elem_id="pf-skip-reason", scale=1)
    with gr.Row():
        submit_btn = gr.Button("Submit (Enter)", variant="primary", elem_id="pf-submit")
        confirm_btn = gr.Button("Confirm AI pair (A)", elem_id="pf-confirm")
        skip_btn = gr.Button("Skip (S)", elem_id="pf-skip")
        undo_btn = gr.Button("Undo last (B)", elem_id="pf-undo")
    gr.HTML(render.keys_html())
    active = gr.Number(visible=False, elem_id="pf-active")
    state = gr.State(Session())
    with gr.Accordion("Queue (admin)", open=False, visible=False) as admin_box:
        refresh_btn = gr.Button("Recompute queue priorities", elem_id="pf-refresh")
        refresh_out = gr.Markdown()
    noop_out = gr.Textbox(visible=False)

    # the order API clients see; every screen handler fills all of them through ``show``
    outputs = [item, chosen, rejected, ranking, all_bad, comment, progress, state]

    def show(view: View) -> dict:
        """A ``View`` -> the screen: the item, fresh 1-k choices, cleared inputs, the progress line, the session."""
        choices = [(f"#{i}", str(i)) for i in range(1, view.k + 1)]
        if view.message:
            gr.Info(view.message, duration=2)
        return {item: view.html, chosen: gr.Radio(choices=choices, value=None),
                rejected: gr.Radio(choices=choices, value=None), ranking: "", all_bad: False, comment: "",
                progress: view.progress, state: view.state}

    def on_load(state_, request: gr.Request):
        user = user_of(request)
        view = as_gr_error(next_item, ctx, user, state_)
        is_admin = as_gr_error(whoami, ctx, user)["role"] == "admin"
        return {**show(view), admin_box: gr.Accordion(visible=is_admin)}

    def on_submit(state_, c, r, rank, bad, note, act, request: gr.Request):
        return show(as_gr_error(submit, ctx, user_of(request), state_, c, r, rank, bad, note, act))

    def on_confirm(state_, note, act, request: gr.Request):
        return show(as_gr_error(confirm_ai, ctx, user_of(request), state_, note, act))

    def on_skip(state_, why, note, act, request: gr.Request):
        return show(as_gr_error(skip, ctx, user_of(request), state_, why, note, act))

    def on_undo(state_, request: gr.Request):
        return show(as_gr_error(undo, ctx, user_of(request), state_))

    def on_refresh(request: gr.Request):
        return as_gr_error(refresh_queue, ctx, user_of(request))

    def on_ping(request: gr.Request):
        """A no-op (for latency baselines): checks the session, touches nothing."""
        as_gr_error(require, ctx, user_of(request), "annotator", "ping")
        return "ok"

    lim = {"concurrency_limit": ctx.concurrency}
    demo.load(on_load, [state], [*outputs, admin_box], api_name="next", **lim)
    submit_btn.click(on_submit, [state, chosen, rejected, ranking, all_bad, comment, active], outputs,
                     api_name="submit", js=_ACTIVE_JS, **lim)
    confirm_btn.click(on_confirm, [state, comment, active], outputs, api_name="confirm_ai", js=_ACTIVE_JS, **lim)
    skip_btn.click(on_skip, [state, reason, comment, active], outputs, api_name="skip", js=_ACTIVE_JS, **lim)
    undo_btn.click(on_undo, [state], outputs, api_name="undo", **lim)
    refresh_btn.click(on_refresh, None, refresh_out, api_name="refresh_queue", **lim)
    noop_out.change(on_ping, None, noop_out, api_name="ping", api_visibility="undocumented", **lim)
