"""Review handlers called directly (no browser): queue orders, claims and expiry, overlap, the AI pair,
disagreement marks, every kind of decision, undo, role refusals, escaping, login throttling."""

from __future__ import annotations

import json
import threading
import typing
from datetime import datetime, timedelta

import pytest

from app.server import AppContext, queue_cache
from app.server import review as rv
from app.server.auth import Authenticator, require
from core import config as cfgmod
from core.errors import AuthError, UsageError
from storage import audit, rounds
from storage import claims as claims_db
from storage import labels as labels_db
from storage import pairs as pairs_db
from storage import prompts as prompts_db
from storage import review_items as items_db
from storage import review_queue as queue_db
from storage import users as users_db
from tests.helpers import SCORES, add_judgment, build_workspace

# Queue order of helpers.SCORES' prompts per queue_order.
EXPECTED = {
    "disagreement": ["p2", "p1", "p3", "p0", "p4"],
    "margin": ["p3", "p1", "p2", "p0", "p4"],          # AI-pair judge: alphabetically first (critic)
    "in_order": ["p0", "p1", "p2", "p3", "p4"],
}


class Clock:
    def __init__(self):
        self.now = datetime(2030, 5, 1, 9, 0, 0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw) -> None:
        self.now += timedelta(**kw)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def make_ctx(tmp_path, clock):
    made = []

    def make(**kw) -> AppContext:
        ws = build_workspace(tmp_path / f"ws{len(made)}", **kw)
        made.append(ws)
        return AppContext(ws, clock=clock)

    yield make
    for ws in made:
        ws.close()


def served(view: rv.View) -> str | None:
    return view.state.item.prompt_id if view.state.item else None


def labels(ctx, prompt_id=None) -> list[dict]:
    return prompts_db.list_labels(ctx.ws.cursor(), prompt_id=prompt_id)


def seed(cur, scores: dict, k: int = 3) -> None:
    """Round 1 of a bare database (the ``db`` fixture) with ``build_workspace``'s rows for ``scores``: prompts
    p0..pN on one image row (no file), k candidates each, critic + gemini judgments."""
    rounds.ensure_first_round(cur, base_model="tiny")
    cur.execute("INSERT INTO images (image_id, path, width, height, format, n_bytes) "
                "VALUES ('img', 'images/im/img.png', 48, 40, 'PNG', 1)")
    prompts_db.insert_prompts(cur, [{"prompt_id": pid, "image_id": "img", "question": f"q {pid}", "source": "test",
                                     "split": "train"} for pid in scores])
    prompts_db.insert_candidates(cur, [{"candidate_id": f"{pid}c{i}", "prompt_id": pid, "round_id": 1,
                                        "text": f"answer {i} of {pid}", "origin": "policy", "sample_index": i}
                                       for pid in scores for i in range(k)])
    for pid, sc in scores.items():
        for judge, overall in zip(("critic", "gemini"), sc or ()):
            for i in range(k):
                add_judgment(cur, f"{pid}c{i}", judge, overall[i])


# ------------------------------------------------------------------------------------------------ queue

def test_queue_registry_matches_config_choices():
    allowed = typing.get_args(cfgmod.ReviewConfig.model_fields["queue_order"].annotation)
    assert set(queue_db.QUEUE_ORDERS) == set(allowed)


@pytest.mark.parametrize("order", list(queue_db.QUEUE_ORDERS))
def test_queue_order_is_stored_and_served_in_order(make_ctx, order):
    ctx = make_ctx(order=order)
    cur = ctx.ws.cursor()
    assert queue_db.refresh_queue(cur, 1) == 5
    ranks = [r["prompt_id"] for r in queue_db.queue_ranks(cur, 1, order)]
    if order in EXPECTED:
        assert ranks == EXPECTED[order]
    else:  # random: a fixed permutation per round, the same after a refresh
        assert sorted(ranks) == sorted(SCORES)
        queue_db.refresh_queue(cur, 1)
        assert [r["prompt_id"] for r in queue_db.queue_ranks(cur, 1, order)] == ranks
    seen, state = [], None
    view = rv.next_item(ctx, "ann", state)
    while served(view):
        seen.append(served(view))
        view = rv.submit(ctx, "ann", view.state, all_bad=True)
    assert seen == ranks
    assert "Nothing to review" in view.html


def test_margin_order_uses_configured_judge(db):
    seed(db, SCORES)
    cur = db
    queue_db.refresh_queue(cur, 1, judge="gemini")
    assert [r["prompt_id"] for r in queue_db.queue_ranks(cur, 1, "margin")] == ["p3", "p2", "p1", "p0", "p4"]


def test_queue_is_computed_lazily_and_refresh_is_admin_only(make_ctx):
    ctx = make_ctx()
    assert queue_db.queue_state(ctx.ws.cursor(), 1) is None
    assert served(rv.next_item(ctx, "ann", None)) == "p2"
    assert queue_db.queue_size(ctx.ws.cursor(), 1) == 5
    with pytest.raises(AuthError, match="admin"):
        rv.refresh_queue(ctx, "ann")
    assert "5 prompts queued" in rv.refresh_queue(ctx, "boss")
    assert audit.recent(ctx.ws.cursor(), action="refused")[0]["actor"] == "ann"


# ------------------------------------------------------------------------------------------------ claims

def test_overlap_1_two_annotators_never_share_a_prompt(make_ctx):
    ctx = make_ctx()
    views = {"ann": rv.next_item(ctx, "ann", None), "bob": rv.next_item(ctx, "bob", None)}
    assert served(views["ann"]) == "p2" and served(views["bob"]) == "p1"
    got: dict[str, list[str]] = {"ann": [], "bob": []}
    while any(served(v) for v in views.values()):
        for who, v in views.items():
            if served(v):
                got[who].append(served(v))
                views[who] = rv.submit(ctx, who, v.state, chosen="1", rejected="2")
    assert not set(got["ann"]) & set(got["bob"])
    assert sorted(got["ann"] + got["bob"]) == sorted(SCORES)
    assert served(rv.next_item(ctx, "cat", None)) is None
    assert len(labels(ctx)) == 5


def test_reload_resumes_the_held_claim(make_ctx):
    ctx = make_ctx()
    first = rv.next_item(ctx, "ann", None)
    again = rv.next_item(ctx, "ann", None)  # new session, same user
    assert served(again) == served(first)
    assert len(claims_db.claims_of(ctx.ws.cursor(), 1)) == 1


def test_claim_expires_and_is_taken_over(make_ctx, clock):
    ctx = make_ctx(scores={"p0": SCORES["p0"]})
    a = rv.next_item(ctx, "ann", None)
    assert served(a) == "p0"
    clock.advance(minutes=14)
    assert served(rv.next_item(ctx, "bob", None)) is None, "held for claim_minutes (15)"
    clock.advance(minutes=2)
    b = rv.next_item(ctx, "bob", None)
    assert served(b) == "p0", "an idle annotator holds nothing forever"
    claims = claims_db.claims_of(ctx.ws.cursor(), 1)
    assert [(c["annotator"], c["status"]) for c in claims] == [("bob", "live")]
    # ann submits late: her label is kept, she is told, and bob still holds the prompt
    late = rv.submit(ctx, "ann", a.state, chosen="1", rejected="3")
    assert "expired" in late.message and "had expired and someone else took it" in late.html
    assert [lb["annotator"] for lb in labels(ctx)] == ["ann"]
    rv.submit(ctx, "bob", b.state, chosen="3", rejected="1")
    assert sorted(lb["annotator"] for lb in labels(ctx)) == ["ann", "bob"]


def test_overlap_2_at_most_two_annotators_never_the_same_twice(make_ctx):
    ctx = make_ctx(overlap=2, scores={"p0": SCORES["p0"], "p1": SCORES["p1"]})
    a, b = rv.next_item(ctx, "ann", None), rv.next_item(ctx, "bob", None)
    assert served(a) == served(b) == "p1"
    c = rv.next_item(ctx, "cat", None)
    assert served(c) == "p0", "p1 has two annotators already"
    a = rv.submit(ctx, "ann", a.state, chosen="1", rejected="2")
    assert served(a) == "p0", "ann never gets p1 twice"
    a = rv.submit(ctx, "ann", a.state, chosen="1", rejected="2")
    assert served(a) is None
    cat_next = rv.submit(ctx, "cat", c.state, all_bad=True)
    assert served(cat_next) is None, "p1 is full (ann done + bob live), p0 is cat's already"
    per_prompt = {}
    for cl in claims_db.claims_of(ctx.ws.cursor(), 1):
        per_prompt.setdefault(cl["prompt_id"], []).append(cl["annotator"])
    assert all(len(v) <= 2 and len(v) == len(set(v)) for v in per_prompt.values())


def test_concurrent_claims_overlap_1_no_prompt_twice_no_label_lost(db):
    seed(db, {f"p{i}": SCORES["p0"] for i in range(40)})
    now = datetime(2030, 1, 1)
    got: dict[str, list[str]] = {}
    errors = []

    def worker(name: str) -> None:
        cur = db.cursor()
        cache = queue_cache.QueueCache(batch=8)
        try:
            while True:
                pid = queue_cache.claim_next(cur, 1, name, order="in_order", overlap=1, claim_minutes=15, now=now,
                                             cache=cache)
                if pid is None:
                    return
                got.setdefault(name, []).append(pid)
                labels_db.submit_label(cur, round_id=1, prompt_id=pid, annotator=name, overlap=1, now=now,
                                       decision=labels_db.Decision(chosen_id=f"{pid}c0", rejected_id=f"{pid}c1"))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(f"u{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    all_served = [p for v in got.values() for p in v]
    assert len(all_served) == len(set(all_served)) == 40
    assert len(prompts_db.list_labels(db)) == 40


# ------------------------------------------------------------------------------------------------ the screen

def test_ai_pair_highlight_and_confirm(make_ctx):
    ctx = make_ctx(order="in_order")
    view = rv.next_item(ctx, "ann", None)  # p0: critic (default judge) 0.9 / 0.5 / 0.1
    assert view.state.item.ai_pair["chosen_id"] == "p0c0"
    assert view.state.item.ai_pair["rejected_id"] == "p0c2"
    assert 'class="pf-cand pf-ai-chosen" data-candidate="p0c0"' in view.html
    assert 'class="pf-cand pf-ai-rejected" data-candidate="p0c2"' in view.html
    assert "AI pair (critic)" in view.html
    rv.confirm_ai(ctx, "ann", view.state, comment="looks right")
    (lb,) = labels(ctx, "p0")
    assert (lb["chosen_id"], lb["rejected_id"], lb["comment"]) == ("p0c0", "p0c2", "looks right")


def test_ai_pair_follows_configured_judge(make_ctx):
    ctx = make_ctx(order="disagreement", pairs_judge="gemini")
    view = rv.next_item(ctx, "ann", None)  # p2: gemini 0.1 / 0.2 / 0.3
    assert served(view) == "p2"
    assert view.state.item.ai_pair["chosen_id"] == "p2c2"
    assert view.state.item.ai_pair["rejected_id"] == "p2c0"


def test_disagreement_mark_and_judge_shapes(make_ctx):
    ctx = make_ctx()
    view = rv.next_item(ctx, "ann", None)  # p2: candidate 0 differs by 0.7, the others by 0
    cards = view.html.split('data-candidate=')[1:]
    assert "pf-disagree" in cards[0] and "judges disagree" in cards[0]
    assert "pf-disagree" not in cards[1] and "pf-disagree" not in cards[2]
    assert cards[0].count("pf-bar-label") == 6, "five rubric bars (gemini) + one score bar (critic)"
    assert ">80<" in cards[0], "critic's native 0-100 score"
    assert "<details" in cards[0] and "reasoning" in cards[0]
    from app.server import render
    near = {"c": {"a": render.JudgeScores("a", overall=0.7), "b": render.JudgeScores("b", overall=0.2)},
            "d": {"a": render.JudgeScores("a", overall=0.7), "b": render.JudgeScores("b", overall=0.21)}}
    assert render.disagreements(near) == {"c"}


def test_pairwise_judge_shows_wins(make_ctx):
    ctx = make_ctx(scores={"p0": SCORES["p0"]})
    cur = ctx.ws.cursor()
    for a, b, w in (("p0c0", "p0c1", "first"), ("p0c1", "p0c0", "second"), ("p0c0", "p0c2", "tie")):
        cur.execute("INSERT INTO pairwise_verdicts (judge, judge_version, first_id, second_id, winner, status) "
                    "VALUES ('pw', 'v1', ?, ?, ?, 'ok')", [a, b, w])
    view = rv.next_item(ctx, "ann", None)
    card0 = view.html.split('data-candidate=')[1]
    assert "wins <b>2</b> · losses <b>0</b> · ties <b>1</b>" in card0


def test_html_in_questions_answers_reasoning_is_escaped(make_ctx):
    ctx = make_ctx()
    html_ = rv.next_item(ctx, "ann", None).html
    for raw in ("<script", "<img src=x", "onerror=alert(1)>", "<b>bold</b>"):
        assert raw not in html_
    assert "&lt;script&gt;alert(&quot;q&quot;)&lt;/script&gt;" in html_
    assert "&lt;img src=x onerror=alert(1)&gt;" in html_
    assert "&lt;script&gt;steal()&lt;/script&gt;" in html_
    assert '<img src="gradio_api/file=' in html_ and "/images/" in html_


def test_demo_model_note(make_ctx):
    assert "does not really see images" in rv.next_item(make_ctx(model="demo"), "ann", None).html
    assert "does not really see images" not in rv.next_item(make_ctx(model="tiny"), "ann", None).html


# ------------------------------------------------------------------------------------------------ decisions

def test_every_kind_of_decision_is_stored(make_ctx):
    ctx = make_ctx(order="in_order")
    v = rv.next_item(ctx, "ann", None)  # p0
    with pytest.raises(UsageError, match="pick a chosen"):
        rv.submit(ctx, "ann", v.state)
    with pytest.raises(UsageError, match="two different"):
        rv.submit(ctx, "ann", v.state, chosen="2", rejected="2")
    with pytest.raises(UsageError, match="does not exist"):
        rv.submit(ctx, "ann", v.state, chosen="1", rejected="4")
    with pytest.raises(UsageError, match="exactly once"):
        rv.submit(ctx, "ann", v.state, ranking="1 1 2")
    v = rv.submit(ctx, "ann", v.state, chosen="3", rejected="1", comment="  third is best ")    # p0: a pair
    v = rv.submit(ctx, "ann", v.state, ranking="2 3 1")                                       # p1: a ranking
    v = rv.submit(ctx, "ann", v.state, ranking="312", chosen="1", rejected="2", all_bad=True)  # p2: all bad wins
    with pytest.raises(UsageError, match="reason"):
        rv.skip(ctx, "ann", v.state, reason=" ")
    v = rv.skip(ctx, "ann", v.state, reason="image unclear")                                  # p3: skip
    rows = {lb["prompt_id"]: lb for lb in labels(ctx)}
    assert (rows["p0"]["chosen_id"], rows["p0"]["rejected_id"], rows["p0"]["comment"]) == ("p0c2", "p0c0",
                                                                                            "third is best")
    assert json.loads(rows["p1"]["ranking"]) == ["p1c1", "p1c2", "p1c0"]
    assert (rows["p1"]["chosen_id"], rows["p1"]["rejected_id"]) == ("p1c1", "p1c0")
    assert rows["p2"]["all_bad"] is True and rows["p2"]["chosen_id"] is None
    assert rows["p3"]["skipped_reason"] == "image unclear"
    assert all(r["annotator"] == "ann" and r["source"] == "human" and r["kind"] == "label" for r in rows.values())
    assert '"kind": "skip"' in audit.recent(ctx.ws.cursor(), action="label")[0]["detail"]
    # the skip freed p3's slot: another annotator gets it, ann does not get it back
    assert served(rv.next_item(ctx, "bob", None)) == "p3"
    assert served(v) == "p4"


def test_active_seconds_capped(make_ctx, clock):
    ctx = make_ctx(order="in_order")
    v = rv.next_item(ctx, "ann", None)
    clock.advance(seconds=30)
    v = rv.submit(ctx, "ann", v.state, chosen="1", rejected="2", active_seconds=500)  # browser said 500: capped at 30
    clock.advance(seconds=300)
    v = rv.submit(ctx, "ann", v.state, chosen="1", rejected="2", active_seconds=42.5)
    clock.advance(seconds=300)
    rv.submit(ctx, "ann", v.state, chosen="1", rejected="2")  # an API client: idle gap counted up to 60 s
    assert [lb["active_seconds"] for lb in labels(ctx)] == [30.0, 42.5, 60.0]
    day = items_db.annotator_day(ctx.ws.cursor(), "ann")
    assert day["labels"] == 3 and day["active_seconds"] == pytest.approx(132.5)


def test_undo_appends_and_reopens_the_item(make_ctx):
    ctx = make_ctx(order="in_order")
    v = rv.next_item(ctx, "ann", None)
    v = rv.submit(ctx, "ann", v.state, chosen="1", rejected="2")
    assert served(v) == "p1"
    u = rv.undo(ctx, "ann", v.state)
    assert served(u) == "p0" and "undid" in u.html
    rows = labels(ctx, "p0")
    assert [r["kind"] for r in rows] == ["label", "undo"], "append-only: nothing updated in place"
    assert pairs_db.pairing_labels(ctx.ws.cursor(), 1) == [], "the latest row (undo) counts"
    with pytest.raises(UsageError, match="nothing to undo"):
        rv.undo(ctx, "ann", u.state)
    v = rv.submit(ctx, "ann", u.state, chosen="2", rejected="1")
    assert served(v) == "p1", "back to the item that was on screen"
    latest = pairs_db.pairing_labels(ctx.ws.cursor(), 1)
    assert [(r["prompt_id"], r["chosen_id"]) for r in latest] == [("p0", "p0c1")]
    assert [a["action"] for a in audit.recent(ctx.ws.cursor()) if a["action"] in ("label", "undo")] == \
        ["label", "undo", "label"]
    with pytest.raises(labels_db.UndoRefused):
        labels_db.undo_label(ctx.ws.cursor(), rows[0]["label_id"], "bob", overlap=1, now=ctx.clock())


def test_labels_after_freeze_are_kept_and_queue_moves_on(make_ctx):
    ctx = make_ctx(order="in_order")
    v = rv.next_item(ctx, "ann", None)
    cur = ctx.ws.cursor()
    pairs_db.insert_pairs(cur, [{"round_id": 1, "prompt_id": "p3", "chosen_id": "p3c0", "rejected_id": "p3c1",
                                 "source": "critic", "strategy": "best-worst"}])
    pairs_db.freeze(cur, 1)
    rounds.open_round(cur, 2, "c0")
    assert served(rv.next_item(ctx, "bob", None)) is None, "round 2 has no candidates yet"
    prompts_db.insert_candidates(cur, [{"candidate_id": f"r2c{i}", "prompt_id": "p4", "round_id": 2,
                                        "text": f"round 2 answer {i}", "origin": "policy", "sample_index": i}
                                       for i in range(2)])
    v = rv.submit(ctx, "ann", v.state, chosen="1", rejected="2")
    assert [(r["round_id"], r["prompt_id"]) for r in labels(ctx)] == [(1, "p0")], "kept after the freeze"
    assert (v.state.item.round_id, v.state.item.prompt_id) == (2, "p4")
    assert "round 2 answer" in v.html


# ------------------------------------------------------------------------------------------------ roles, auth

def test_roles_are_checked_in_handlers(make_ctx):
    ctx = make_ctx()
    for fn, args in ((rv.next_item, (None,)), (rv.submit, (None,)), (rv.undo, (None,)), (rv.skip, (None,))):
        with pytest.raises(AuthError, match="not logged in"):
            fn(ctx, None, *args)
    with pytest.raises(AuthError, match="no longer exists"):
        rv.next_item(ctx, "mallory", None)
    assert require(ctx, "boss", "annotator").role == "admin", "an admin may review too"
    users_db.remove_user(ctx.ws.cursor(), "bob")
    with pytest.raises(AuthError):
        rv.next_item(ctx, "bob", None)


def test_password_hash_is_scrypt_with_params_and_salt():
    h1, h2 = users_db.hash_password("s3cret-pass"), users_db.hash_password("s3cret-pass")
    assert h1.startswith("scrypt$n=16384,r=8,p=1$") and h1 != h2 and "s3cret" not in h1
    assert users_db.verify_password("s3cret-pass", h1) and not users_db.verify_password("s3cret-pasS", h1)
    assert not users_db.verify_password("x", "garbage")


def test_login_throttle_and_audit(make_ctx, clock):
    from fastapi import HTTPException

    ctx = make_ctx()
    auth = Authenticator(ctx)
    assert auth.verify("ann", "ann-password")
    for _ in range(3):
        assert not auth.verify("ann", "wrong-guess")
    assert not auth.verify("ann", "wrong-guess"), "4th failure: now locked for 2 s"
    with pytest.raises(HTTPException) as err:
        auth.verify("ann", "ann-password")
    assert err.value.status_code == 429 and "try again" in err.value.detail
    clock.advance(seconds=3)
    assert not auth.verify("ann", "wrong-guess")  # 5th: 4 s
    clock.advance(seconds=3)
    with pytest.raises(HTTPException):
        auth.verify("ann", "ann-password")
    clock.advance(seconds=2)
    assert auth.verify("ann", "ann-password"), "after the delay the right password works and resets"
    assert auth.verify("bob", "bob-password"), "throttling is per user name"
    assert not auth.verify("nobody", "whatever1")
    fails = audit.recent(ctx.ws.cursor(), action="login_failed")
    assert len(fails) == 8 and {f["actor"] for f in fails} == {"ann", "nobody"}
    dump = json.dumps([dict(r, created_at=str(r["created_at"])) for r in audit.recent(ctx.ws.cursor(), 500)])
    assert "wrong-guess" not in dump and "ann-password" not in dump and "whatever1" not in dump
    assert users_db.throttle_delay(3) == 0 and users_db.throttle_delay(4) == 2.0 and users_db.throttle_delay(5) == 4.0
