"""The gemini judge: the real google-genai SDK against the fake Gemini server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
from pathlib import Path

import pytest
from fakes.gemini_server import (
    FakeGemini,
    blocked,
    default_scores,
    error,
    extra_candidate,
    hang,
    malformed,
    missing_candidate,
    out_of_range,
    text,
)
from PIL import Image

from annotators import rubric
from annotators.base import METRICS, CandidateText, JudgeItem, rubric_overall
from annotators.gemini import TEMPLATE_VERSION, GeminiJudge, make_gemini
from annotators.judge_cache import JudgeCache
from annotators.ratelimit import SlidingWindowLimiter, max_in_window
from core.config import GeminiConfig, WorkspaceConfig
from core.errors import ConfigError

KEY = "fake-key-7f3a9c21-do-not-leak"


@pytest.fixture
def fake():
    with FakeGemini(api_key=KEY) as server:
        yield server


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "img.png"
    img = Image.new("RGB", (40, 32), (30, 120, 200))
    img.putpixel((3, 4), (255, 255, 0))
    img.save(path)
    return path


def make_items(image: Path, n: int, k: int = 4, tag: str = "", question: str = "What is in the picture?"):
    return [JudgeItem(prompt_id=f"p{tag}{i}", question=f"{question} #{tag}{i}", image_path=str(image),
                      image_id="sha-" + "a" * 60,
                      candidates=tuple(CandidateText(f"c{tag}{i}-{j}", f"answer {j} to prompt {tag}{i}")
                                       for j in range(k)))
            for i in range(n)]


def config(fake: FakeGemini, **kw) -> GeminiConfig:
    base = {"base_url": fake.url, "backoff_s": 0.01, "timeout_s": 5.0, "max_retries": 3, "concurrency": 4,
            "requests_per_minute": 10_000}
    return GeminiConfig(**{**base, **kw})


def judge_for(fake, tmp_path, **kw) -> GeminiJudge:
    return GeminiJudge(config(fake, **kw), tmp_path / "cache" / "gemini.jsonl", api_key=KEY)


# ---- scores and mapping -------------------------------------------------------------------------

def test_scores_are_parsed_and_mapped_back_through_the_shuffle(fake, image, tmp_path):
    items = make_items(image, 6, k=4)
    judge = judge_for(fake, tmp_path, temperature=0.3, model="gemini-test-model")
    verdicts = judge.judge(items)

    assert [v.prompt_id for v in verdicts] == [it.prompt_id for it in items]
    texts = {c.candidate_id: c.text for it in items for c in it.candidates}
    for item, v in zip(items, verdicts):
        assert v.status == "ok", v.error
        assert [s.candidate_id for s in v.scores] == [c.candidate_id for c in item.candidates]
        for s in v.scores:
            expected = default_scores(texts[s.candidate_id])
            assert {m: getattr(s, m) for m in METRICS} == expected
            assert s.overall == pytest.approx(rubric_overall(s))
        assert v.reasoning and v.raw_output and json.loads(v.raw_output)["ratings"]
        assert v.tokens_in > 258 and v.tokens_out > 0 and v.latency_ms > 0

    reqs = fake.requests
    assert len(reqs) == len(items)  # one call per prompt, all candidates in it
    shown = {r.question: r.candidates for r in reqs}
    assert sum(shown[it.question] != [c.text for c in it.candidates] for it in items) >= 3  # really shuffled
    for it in items:
        assert sorted(shown[it.question]) == sorted(c.text for c in it.candidates)
    r = reqs[0]
    assert r.model == "gemini-test-model" and r.path.endswith("/models/gemini-test-model:generateContent")
    assert r.images == [("image/png", image.stat().st_size)]
    gc = r.generation_config
    assert gc["responseMimeType"] == "application/json" and gc["temperature"] == 0.3
    assert list(gc["responseJsonSchema"]["properties"]) == ["reasoning", "ratings"]
    assert "Helpfulness" in r.system and "Verbosity" in r.system
    assert r.headers["X-Server-Timeout"] == "5"  # timeout_s reaches the SDK (and through it the server)
    assert judge.stats.tokens_in == sum(v.tokens_in for v in verdicts)
    assert judge.stats.ok == 6 and judge.stats.calls == 6 and judge.stats.retries == 0


def test_the_guide_is_helpsteers_five_attributes_with_reasoning_and_calibration_before_ratings():
    guide = rubric.labelling_guide()
    for m in rubric.RUBRIC.values():
        assert f"## {m.name.capitalize()}" in guide and m.definition in guide
        assert all(f"- {i}: {level}" in guide for i, level in enumerate(m.levels))
    # HelpSteer's published one-line definitions (nvidia/HelpSteer card) are restated, not copied
    published_definitions = ("Overall helpfulness of the response to the prompt",
                             "Inclusion of all pertinent facts", "Consistency and clarity of expression",
                             "Intellectual depth required to write", "Amount of detail included in the")
    for published in published_definitions:
        assert published.lower() not in guide.lower()
    # zero-shot chain of thought: reasoning per candidate, then a calibration across them, then ratings
    reasoning, calibrate, ratings = (guide.index(w) for w in ("First write `reasoning`", "calibrate",
                                                              "then write `ratings`"))
    assert reasoning < calibrate < ratings
    schema = rubric.response_json_schema(4)
    assert list(schema["properties"]) == schema["required"] == ["reasoning", "ratings"]
    assert "calibration" in schema["properties"]["reasoning"]["description"]


def test_presentation_order_is_seeded_per_prompt():
    a = rubric.presentation_order("p1", 0, 5)
    assert a == rubric.presentation_order("p1", 0, 5) and sorted(a) == list(range(5))
    others = [rubric.presentation_order(p, s, 5) for p, s in [("p2", 0), ("p1", 1), ("p3", 0), ("p1", 7)]]
    assert any(o != a for o in others)


@pytest.mark.parametrize("responder, reason", [
    (malformed(), "not valid JSON"),
    (missing_candidate(), "not rated"),
    (out_of_range(), "less than or equal to 4"),
    (out_of_range("coherence", -1), "greater than or equal to 0"),
    (extra_candidate(), "only 3"),
    (text('{"reasoning": "x", "ratings": [{"candidate": 1, "helpfulness": "3"}]}'), "rating #1"),
    (text(""), "empty reply"),
    (blocked(), "no text in the reply (finish reason SAFETY)"),
])
def test_bad_replies_are_invalid_with_raw_output_kept(fake, image, tmp_path, responder, reason):
    fake.add_rule(responder)
    [v] = judge_for(fake, tmp_path).judge(make_items(image, 1, k=3))
    assert v.status == "invalid"
    assert reason in v.error
    assert v.raw_output == fake_text(fake)
    assert all(s.status == "invalid" and s.helpfulness is None for s in v.scores) and len(v.scores) == 3
    assert len(fake.requests) == 1  # an invalid reply was paid for: not retried


def fake_text(fake: FakeGemini) -> str:
    """The model text the fake sent back for its last request (rebuilt from the request)."""
    req = fake.requests[-1]
    rule = fake._rules[0]
    reply = rule.responder if not callable(rule.responder) else rule.responder(req, fake)
    return reply.text


def test_rubric_parser_accepts_a_fenced_reply_and_rejects_duplicates():
    good = {"reasoning": "ok", "ratings": [{"candidate": i, **{m: 2 for m in METRICS}} for i in (1, 2)]}
    assert rubric.parse_reply("```json\n" + json.dumps(good) + "\n```", 2).ratings[2]["coherence"] == 2
    dup = dict(good, ratings=[good["ratings"][0], good["ratings"][0]])
    with pytest.raises(rubric.RubricParseError, match="more than once"):
        rubric.parse_reply(json.dumps(dup), 2)
    floaty = dict(good, ratings=[dict(good["ratings"][0], helpfulness=2.5), good["ratings"][1]])
    with pytest.raises(rubric.RubricParseError, match="helpfulness"):
        rubric.parse_reply(json.dumps(floaty), 2)


# ---- retries, timeouts, errors --------------------------------------------------------------------

def test_429_twice_then_success_is_ok_after_two_retries(fake, image, tmp_path):
    fake.add_rule(error(429), times=2)
    judge = judge_for(fake, tmp_path)
    [v] = judge.judge(make_items(image, 1))
    assert v.status == "ok"
    assert judge.stats.retries == 2 and judge.stats.calls == 3
    assert [r.status for r in fake.requests] == [429, 429, 200]


def test_persistent_500_is_an_error_after_max_retries(fake, image, tmp_path):
    fake.add_rule(error(500))
    judge = judge_for(fake, tmp_path, max_retries=2, backoff_s=0.05)
    [v] = judge.judge(make_items(image, 1))
    assert v.status == "error" and "500" in v.error and "3 attempts" in v.error
    # our loop, not the SDK, retries: exactly 1 + max_retries requests reach the server
    arrivals = fake.arrivals()
    assert len(arrivals) == 3 and judge.stats.retries == 2
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert gaps[0] >= 0.025 and gaps[1] >= 0.05  # exponential backoff, jitter 50-100 %


def test_a_hang_past_the_timeout_is_retried_then_an_error(fake, image, tmp_path):
    fake.add_rule(hang(5.0))
    judge = judge_for(fake, tmp_path, timeout_s=0.5, max_retries=1)
    t0 = time.monotonic()
    [v] = judge.judge(make_items(image, 1))
    elapsed = time.monotonic() - t0
    assert v.status == "error" and "no reply within 0.5 s" in v.error
    assert len(fake.requests) == 2 and judge.stats.retries == 1
    assert 1.0 <= elapsed < 3.0


def test_a_429_retry_delay_from_the_server_is_honoured(fake, image, tmp_path):
    fake.add_rule(error(429, retry_delay_s=0.6), times=1)
    [v] = judge_for(fake, tmp_path).judge(make_items(image, 1))
    a = fake.arrivals()
    assert v.status == "ok" and len(a) == 2 and a[1] - a[0] >= 0.6


def test_an_outage_is_ridden_out_by_the_retries(fake, image, tmp_path):
    fake.outage(0.6)
    judge = judge_for(fake, tmp_path, backoff_s=0.1, max_retries=6)
    verdicts = judge.judge(make_items(image, 4))
    assert [v.status for v in verdicts] == ["ok"] * 4
    statuses = [r.status for r in fake.requests]
    assert statuses.count(503) >= 4 and statuses.count(200) == 4


def test_a_wrong_key_stops_the_batch_after_one_request(image, tmp_path):
    with FakeGemini(api_key="the-right-key") as fake:
        judge = GeminiJudge(config(fake, concurrency=1), tmp_path / "c.jsonl", api_key="a-wrong-key")
        verdicts = judge.judge(make_items(image, 3))
        assert [v.status for v in verdicts] == ["error"] * 3
        assert "API key" in verdicts[0].error and "GEMINI_API_KEY" in verdicts[0].error
        assert len(fake.requests) == 1 and fake.requests[0].key_sent and not fake.requests[0].key_ok


def test_one_bad_item_does_not_kill_the_batch(fake, image, tmp_path):
    items = make_items(image, 5)
    items[1] = JudgeItem(**{**items[1].__dict__, "question": "BROKEN please"})
    items[2] = JudgeItem(**{**items[2].__dict__, "question": "FAIL please"})
    items[3] = JudgeItem(**{**items[3].__dict__, "image_path": str(tmp_path / "missing.png")})
    fake.add_rule(malformed(), when="BROKEN")
    fake.add_rule(error(500), when="FAIL")
    progress = []
    judge = GeminiJudge(config(fake, max_retries=1), tmp_path / "c.jsonl", api_key=KEY,
                        on_progress=lambda done, total: progress.append((done, total)))
    verdicts = judge.judge(items)
    assert [v.status for v in verdicts] == ["ok", "invalid", "error", "error", "ok"]
    assert "cannot read image" in verdicts[3].error and "500" in verdicts[2].error
    assert (judge.stats.ok, judge.stats.invalid, judge.stats.error) == (2, 1, 2)
    assert len(progress) == 5 and progress[-1] == (5, 5)
    assert len(fake.requests) == 1 + 1 + 2 + 1  # the missing image never left the machine

    # a re-run pays only for the errors: ok and invalid replies were paid for and are cached
    fake.reset()
    again = GeminiJudge(config(fake, max_retries=1), tmp_path / "c.jsonl", api_key=KEY).judge(items)
    assert [v.status for v in again] == ["ok", "invalid", "error", "error", "ok"]
    assert {r.question for r in fake.requests} == {items[2].question}


# ---- the cache ----------------------------------------------------------------------------------

def test_a_second_run_over_the_same_items_sends_no_request(fake, image, tmp_path):
    items = make_items(image, 5)
    first = judge_for(fake, tmp_path).judge(items)
    assert len(fake.requests) == 5
    fake.reset()
    judge = judge_for(fake, tmp_path)
    second = judge.judge(items)
    assert fake.requests == []
    assert judge.stats.cache_hits == 5 and judge.stats.calls == 0
    assert [[(s.candidate_id, s.helpfulness, s.verbosity) for s in v.scores] for v in second] == \
           [[(s.candidate_id, s.helpfulness, s.verbosity) for s in v.scores] for v in first]
    assert [v.tokens_in for v in second] == [v.tokens_in for v in first]  # what the judgment cost


def test_duplicate_items_in_one_batch_are_sent_once(fake, image, tmp_path):
    [item] = make_items(image, 1)
    twin = JudgeItem(**{**item.__dict__, "prompt_id": "twin",
                        "candidates": tuple(CandidateText("t" + c.candidate_id, c.text) for c in item.candidates)})
    verdicts = judge_for(fake, tmp_path).judge([item, twin])
    assert len(fake.requests) == 1
    assert [s.helpfulness for s in verdicts[0].scores] == [s.helpfulness for s in verdicts[1].scores]
    assert verdicts[1].scores[0].candidate_id == "t" + item.candidates[0].candidate_id


def test_a_torn_last_line_is_ignored_and_cut_before_the_next_append(fake, image, tmp_path):
    items = make_items(image, 4)
    judge_for(fake, tmp_path).judge(items[:3])
    path = tmp_path / "cache" / "gemini.jsonl"
    full = path.read_bytes()
    with open(path, "ab") as f:
        f.write(full.splitlines()[0][:57])  # a crash in the middle of writing a line
    cache = JudgeCache(path)
    assert len(cache) == 3 and cache.skipped_lines == 1
    assert path.read_bytes() == full  # the torn tail is gone

    fake.reset()
    judge = judge_for(fake, tmp_path)
    verdicts = judge.judge(items)
    assert [v.status for v in verdicts] == ["ok"] * 4 and judge.stats.cache_hits == 3
    assert len(fake.requests) == 1
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["key"] for line in lines)


def test_each_reply_is_on_disk_before_the_batch_ends(fake, image, tmp_path):
    path = tmp_path / "cache" / "gemini.jsonl"
    seen = []
    judge = GeminiJudge(config(fake, concurrency=1), path, api_key=KEY,
                        on_progress=lambda done, total: seen.append(
                            (done, len(path.read_text().splitlines()))))
    judge.judge(make_items(image, 3))
    # Each reported item is already on disk. With concurrency 1 a second worker may finish its call
    # while the first is between its append and its report, so lines can run ahead of `done`.
    assert [d for d, _ in seen] == [1, 2, 3]
    assert all(lines >= done for done, lines in seen), seen
    assert seen[-1][1] == 3


# ---- limits -------------------------------------------------------------------------------------

def test_the_request_limit_holds_on_the_servers_arrival_clock(fake, image, tmp_path):
    window, limit = 1.0, 5
    limiter = SlidingWindowLimiter(limit, 10**9, window_s=window)
    judge = GeminiJudge(config(fake, concurrency=8), tmp_path / "c.jsonl", api_key=KEY, limiter=limiter)
    t0 = time.monotonic()
    verdicts = judge.judge(make_items(image, 12))
    elapsed = time.monotonic() - t0
    assert all(v.status == "ok" for v in verdicts)
    arrivals = fake.arrivals()
    assert len(arrivals) == 12
    assert max_in_window(arrivals, window) <= limit  # on the server's clock, no slack
    assert elapsed >= 2 * window  # 12 requests at 5 per window need three windows
    assert judge.stats.rate_wait_s > 0


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.now += s
        await asyncio.sleep(0)


def test_limiter_requests_and_tokens_in_simulated_time():
    clock = FakeClock()

    async def times(limiter, costs, settle=None):
        out = []
        for cost in costs:
            ticket = await limiter.acquire(cost)
            out.append(clock.now)
            ticket.done(settle)
        return out

    by_requests = SlidingWindowLimiter(3, 10**6, 60, clock=clock, sleep=clock.sleep)
    assert asyncio.run(times(by_requests, [1] * 7)) == [0, 0, 0, 60, 60, 60, 120]
    clock.now = 0.0
    by_tokens = SlidingWindowLimiter(100, 100, 60, clock=clock, sleep=clock.sleep)
    assert asyncio.run(times(by_tokens, [40] * 5)) == [0, 0, 60, 60, 120]
    clock.now = 1000.0
    corrected = SlidingWindowLimiter(100, 100, 60, clock=clock, sleep=clock.sleep)
    assert asyncio.run(times(corrected, [90, 90, 90], settle=10)) == [1000, 1000, 1060]  # unsettled: 1060, 1120
    clock.now = 5000.0
    oversized = SlidingWindowLimiter(100, 100, 60, clock=clock, sleep=clock.sleep)
    assert asyncio.run(times(oversized, [10, 500, 10])) == [5000, 5060, 5120]


def test_a_request_in_flight_holds_its_place_until_a_window_after_it_is_done():
    clock = FakeClock()
    limiter = SlidingWindowLimiter(2, 10**6, 10, clock=clock, sleep=clock.sleep)

    async def main():
        a = await limiter.acquire(1)
        await limiter.acquire(1)  # b: never done in this test

        async def finish_a_at_5():
            await clock.sleep(5)
            a.done()
        finisher = asyncio.create_task(finish_a_at_5())
        await limiter.acquire(1)
        await finisher
        return clock.now
    assert asyncio.run(main()) == 15  # a arrived at the server by 5 at the latest: 5 + 10


def test_concurrent_waiters_never_exceed_the_window_in_simulated_time():
    clock = FakeClock()
    limiter = SlidingWindowLimiter(4, 10**6, 10, clock=clock, sleep=clock.sleep)

    async def main():
        stamps = []

        async def one():
            ticket = await limiter.acquire(1)
            stamps.append(clock.now)
            ticket.done()
        await asyncio.gather(*(one() for _ in range(17)))
        return stamps
    stamps = asyncio.run(main())
    assert len(stamps) == 17 and max_in_window(stamps, 10) == 4 and max(stamps) == 40


# ---- the key ------------------------------------------------------------------------------------

def test_no_key_is_one_clear_error_before_any_request(fake, tmp_path, monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="GEMINI_API_KEY") as err:
        GeminiJudge(config(fake), tmp_path / "c.jsonl")
    assert "prefloop.toml" in str(err.value)
    with pytest.raises(ConfigError):
        make_gemini(WorkspaceConfig(), tmp_path)
    assert fake.requests == []


def test_the_key_comes_from_the_environment_and_is_never_written(fake, image, tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    (ws / "logs").mkdir(parents=True)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    handler = logging.FileHandler(ws / "logs" / "judge.log")
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        items = make_items(image, 4)
        items[1] = JudgeItem(**{**items[1].__dict__, "question": "BROKEN"})
        items[2] = JudgeItem(**{**items[2].__dict__, "question": "FAIL"})
        fake.add_rule(malformed(), when="BROKEN")
        fake.add_rule(error(503), when="FAIL")
        cfg = WorkspaceConfig.model_validate({"judges": {"gemini": config(fake, max_retries=1).model_dump()}})
        judge = make_gemini(cfg, ws)
        assert judge.cache.path == ws / "runs" / "judge_cache" / f"gemini-{TEMPLATE_VERSION}.jsonl"
        verdicts = judge.judge(items)
        assert [v.status for v in verdicts] == ["ok", "invalid", "error", "ok"]
        logging.getLogger("annotators.gemini").info("judge is %r, stats %s", judge, judge.stats)
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(old_level)
    assert all(r.key_sent and r.key_ok for r in fake.requests)
    written = [p for p in ws.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"judge.log", f"gemini-{TEMPLATE_VERSION}.jsonl"}
    assert (ws / "logs" / "judge.log").stat().st_size > 0
    for p in written:
        assert KEY.encode() not in p.read_bytes(), p
    assert KEY not in repr(judge) and KEY not in json.dumps(judge.stats.as_dict())


def test_base_url_from_the_sdk_environment_variable(fake, image, tmp_path, monkeypatch):
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", fake.url)
    judge = GeminiJudge(GeminiConfig(backoff_s=0.01), tmp_path / "c.jsonl", api_key=KEY)
    [v] = judge.judge(make_items(image, 1))
    assert v.status == "ok" and len(fake.requests) == 1


# ---- calling conventions --------------------------------------------------------------------------

def test_judge_works_from_a_worker_thread_and_inside_a_running_loop(fake, image, tmp_path):
    judge = judge_for(fake, tmp_path)
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("thread", judge.judge(make_items(image, 2, tag="t"))))
    worker.start()
    worker.join(30)

    async def in_loop():
        return judge.judge(make_items(image, 2, tag="l"))
    out["loop"] = asyncio.run(in_loop())
    assert [v.status for v in out["thread"] + out["loop"]] == ["ok"] * 4
    assert len(fake.requests) == 4


def test_relative_image_paths_resolve_against_the_workspace(fake, image, tmp_path, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    cfg = WorkspaceConfig.model_validate({"judges": {"gemini": config(fake).model_dump()}})
    [item] = make_items(image, 1)
    item = JudgeItem(**{**item.__dict__, "image_path": image.name})
    [v] = make_gemini(cfg, image.parent).judge([item])
    assert v.status == "ok"
