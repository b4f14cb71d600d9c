"""Gemini batch judging (issue 15): the real google-genai SDK's batches API against the fake server's batch
endpoints; a restart of the owner picks up the same job; results equal the online path's; failed items go
online; the doctor's judge cost row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from annotators import rubric
from annotators.base import CandidateText, JudgeItem
from annotators.gemini import GeminiJudge, estimate_tokens, make_gemini
from annotators.gemini_batch import STATE_NAME, BatchPending, GeminiBatchJudge
from annotators.gemini_cost import estimate
from backend import doctor, loop
from backend.steps.judge import run_judge
from core import config as cfgmod
from core.config import GeminiConfig
from storage import judge_usage, rounds
from storage import judgments as jstore
from storage.workspace import open_workspace
from tests.fakes.gemini_server import FakeGemini, error, malformed
from tests.helpers import make_image, q, review_workspace

KEY = "fake-key-batch-3c1d"
STORED = ("candidate_id", "helpfulness", "correctness", "coherence", "complexity", "verbosity", "overall",
          "reasoning", "raw_output", "status", "tokens_in", "tokens_out")


@pytest.fixture
def fake():
    with FakeGemini(api_key=KEY) as server:
        yield server


def items_for(tmp_path: Path, n: int, k: int = 3) -> list[JudgeItem]:
    image = make_image(tmp_path / "img.png", size=(40, 32))
    return [JudgeItem(prompt_id=f"p{i}", question=f"What is in picture {i}?", image_path=str(image),
                      image_id="sha-" + "b" * 60,
                      candidates=tuple(CandidateText(f"c{i}-{j}", f"answer {j} to prompt {i}")
                                       for j in range(k)))
            for i in range(n)]


def batch_judge(fake: FakeGemini, cache: Path, **kw) -> GeminiBatchJudge:
    cfg = GeminiConfig(base_url=fake.url, backoff_s=0.01, max_retries=1, mode="batch", **kw)
    return GeminiBatchJudge(GeminiJudge(cfg, cache, api_key=KEY))


def workspace_with(root: Path, rows: list[dict], changes: dict):
    """An open workspace with ``rows`` imported (images under root/data); no model is needed to judge."""
    (root / "no-model").mkdir(parents=True, exist_ok=True)
    return review_workspace(root, root / "no-model", rows, changes)


def online(fake: FakeGemini) -> list:
    return [r for r in fake.requests if r.batch is None]


def test_submit_then_a_restarted_owner_picks_up_the_same_job(fake, tmp_path):
    items = items_for(tmp_path, 4)
    run_dir, cache = tmp_path / "run", tmp_path / "cache" / "gemini.jsonl"
    fake.batch_running_polls = 1
    with pytest.raises(BatchPending) as waiting:
        batch_judge(fake, cache).prepare(items, run_dir)
    [(post, create_path), (get, poll_path)] = fake.batch_calls
    [name] = fake.batches
    assert (post, get) == ("POST", "GET")
    assert create_path.endswith("/models/gemini-2.5-flash:batchGenerateContent")
    assert poll_path.endswith("/" + name)
    assert f"Gemini batch {name} (state RUNNING, 4 requests, submitted" in waiting.value.what
    state = json.loads((run_dir / STATE_NAME).read_text())
    assert [j["name"] for j in state["jobs"]] == [name] and not state["jobs"][0]["ingested"]
    assert [r["prompt_id"] for r in state["jobs"][0]["requests"]] == ["p0", "p1", "p2", "p3"]
    sent = fake.batches[name].requests
    assert online(fake) == [] and len(sent) == 4  # nothing was judged online
    assert "Helpfulness" in sent[0].system and sent[0].images and sent[0].images[0][0] == "image/png"
    assert list(sent[0].generation_config["responseJsonSchema"]["properties"]) == ["reasoning", "ratings"]
    assert sent[0].metadata["key"] == state["jobs"][0]["requests"][0]["key"]
    assert KEY not in (run_dir / STATE_NAME).read_text()

    # the owner restarts: new judge objects, the same run folder; the stored job is polled, not resubmitted
    again = batch_judge(fake, cache)
    again.prepare(items, run_dir)
    assert [c[0] for c in fake.batch_calls] == ["POST", "GET", "GET"] and fake.batch_calls[-1][1] == poll_path
    verdicts = again.judge(items)
    assert [v.status for v in verdicts] == ["ok"] * 4 and online(fake) == []
    assert all(json.loads(line)["batch"] == name for line in cache.read_text().splitlines())
    assert json.loads((run_dir / STATE_NAME).read_text())["jobs"][0]["ingested"] is True
    # a later call finds everything in the cache: no new job, no call
    fake.reset()
    assert [v.status for v in again.judge(items)] == ["ok"] * 4
    assert fake.requests == [] and len(fake.batch_calls) == 3


def test_a_failed_item_is_retried_online_and_an_invalid_reply_is_kept(fake, tmp_path):
    items = items_for(tmp_path, 4)
    fake.add_rule(error(500), when="picture 1?", times=1)  # the batch answers item 1 with an error
    fake.add_rule(malformed(), when="picture 2?", times=1)  # a paid reply that does not validate
    judge = batch_judge(fake, tmp_path / "c.jsonl")
    verdicts = judge.judge(items)
    assert [v.status for v in verdicts] == ["ok", "ok", "invalid", "ok"]
    assert [r.question for r in online(fake)] == [items[1].question]  # only the failed item went online
    [job] = json.loads((tmp_path / STATE_NAME).read_text())["jobs"]
    assert list(job["failed"].values()) == ["batch item error 500: fake INTERNAL"]
    assert "not valid JSON" in verdicts[2].error


def test_a_failed_job_sends_its_items_online_and_big_steps_are_split(fake, tmp_path):
    items = items_for(tmp_path, 5)
    fake.batch_running_polls = 5
    judge = batch_judge(fake, tmp_path / "c.jsonl", batch_max_mb=0.01)  # ~10 kB: one request per job
    with pytest.raises(BatchPending) as waiting:
        judge.prepare(items, tmp_path / "run")
    assert len(fake.batches) == 5 and "5 requests" in waiting.value.what
    names = list(fake.batches)
    fake.end_batch(names[0], "BATCH_STATE_FAILED")
    fake.end_batch(names[1], "BATCH_STATE_EXPIRED")
    for name in names[2:]:
        fake.end_batch(name)
    verdicts = judge.judge(items)
    assert [v.status for v in verdicts] == ["ok"] * 5
    assert sorted(r.question for r in online(fake)) == [items[0].question, items[1].question]


def test_batch_results_equal_what_the_online_path_stores(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    stored = {}
    for mode in ("online", "batch"):
        root = tmp_path / mode
        rows = []
        for i in range(3):
            make_image(root / "data" / f"i{i}.png", size=(30 + i, 24), color=(40 * i, 120, 60))
            rows.append({"image": f"i{i}.png", "question": f"What is in picture {i}?",
                         "candidates": [f"A short answer {i}.", f"A longer answer {i}, with detail.",
                                        f"No {i}."]})
        with FakeGemini(api_key=KEY) as fake:
            ws = workspace_with(root, rows, {"judges.gemini.base_url": fake.url, "judges.gemini.mode": mode})
            summary = run_judge(ws, "gemini")
            assert summary["ok"] == 9 and summary["prompts"] == 3
            assert len(online(fake)) == (3 if mode == "online" else 0)
            assert len(fake.batches) == (1 if mode == "batch" else 0)
            ws.close()
        stored[mode] = q(ws.root, f"SELECT {', '.join(STORED)} FROM judgments ORDER BY candidate_id")
    assert stored["batch"] == stored["online"] and len(stored["online"]) == 9


def test_the_round_waits_for_the_batch_and_resume_ingests_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    rows = []
    for i in range(3):
        make_image(tmp_path / "data" / f"i{i}.png", size=(30 + i, 24))
        rows.append({"image": f"i{i}.png", "question": f"Question {i}?",
                     "candidates": [f"yes {i}", f"no {i}"]})
    with FakeGemini(api_key=KEY) as fake:
        fake.batch_running_polls = 1
        changes = {"judges.gemini.base_url": fake.url, "judges.gemini.mode": "batch",
                   "judges.default": ["gemini"], "review.required": "required", "review.quota": 1}
        ws = workspace_with(tmp_path, rows, changes)
        rounds.set_round(ws.cursor(), 1, step="judge")
        res = loop.run_rounds(ws, 1)
        [name] = fake.batches
        assert res["stopped"].startswith(f"round 1 waits for Gemini batch {name} (state RUNNING, 3 requests")
        assert res["stopped"].endswith("`prefloop round resume` picks the results up")
        ws.close()
        assert q(ws.root, "SELECT status, step FROM rounds") == [("waiting", "judge")]
        assert q(ws.root, "SELECT count(*) FROM judgments")[0][0] == 0
        assert q(ws.root, "SELECT count(*) FROM round_steps WHERE step = 'judge-gemini'")[0][0] == 0

        ws = open_workspace(ws.root)  # the owner restarted
        res = loop.resume_round(ws).run()
        ws.close()
        assert res["stopped"] == "round 1 waits for review: 0/1 prompts labelled; `prefloop round resume` " \
                                 "continues once the quota is met"
        assert [c[0] for c in fake.batch_calls] == ["POST", "GET", "GET"] and len(fake.batches) == 1
        assert online(fake) == []
    assert q(ws.root, "SELECT status, count(*) FROM judgments GROUP BY 1") == [("ok", 6)]
    assert q(ws.root, "SELECT status FROM round_steps WHERE step = 'judge-gemini'") == [("done",)]
    assert (ws.root / "runs" / "r001" / "judge-gemini" / STATE_NAME).is_file()


def test_the_judge_command_says_it_waits(tmp_path, monkeypatch, capsys):
    from app.cli import main

    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    make_image(tmp_path / "data" / "i.png")
    with FakeGemini(api_key=KEY) as fake:
        fake.batch_running_polls = 1
        ws = workspace_with(tmp_path, [{"image": "i.png", "question": "Q?", "candidates": ["a"]}],
                            {"judges.gemini.base_url": fake.url, "judges.gemini.mode": "batch"})
        ws.close()
        assert main(["judge", "-w", str(ws.root), "--judge", "gemini", "--quiet"]) == 0
        assert "waits for Gemini batch batches/" in capsys.readouterr().out
        assert main(["judge", "-w", str(ws.root), "--judge", "gemini", "--quiet"]) == 0
        assert "judged 1 candidates of 1 prompts: 1 ok" in capsys.readouterr().out
        assert len(fake.batches) == 1 and online(fake) == []


def test_the_doctor_row_shows_tokens_and_both_costs(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    rows = []
    for i in range(3):
        make_image(tmp_path / "data" / f"i{i}.png", size=(800 + 100 * i, 600))
        rows.append({"image": f"i{i}.png", "question": f"What is shown here, {i}?",
                     "candidates": [f"answer {j} " * (i + j + 1) for j in range(3)]})
    rows.append({"image": "i0.png", "question": "Not generated yet?"})  # a train prompt with no candidates
    prices = {"judges.gemini.price_input_per_mtok": 2.0, "judges.gemini.price_output_per_mtok": 10.0,
              "judges.gemini.batch_discount": 0.5, "judges.default": ["gemini"], "generation.k": 2,
              "generation.views": ["original", "aug:hflip"], "generation.max_new_tokens": 16}
    with FakeGemini(api_key=KEY) as fake:
        ws = workspace_with(tmp_path, rows, {"judges.gemini.base_url": fake.url, **prices})
        cur = ws.cursor()
        inputs = judge_usage.judge_inputs(cur, 1)
        ctx = doctor.Context(config=ws.config, root=ws.root, policy_path="unused", judge_inputs=inputs,
                             judge_measured=judge_usage.measured_tokens(cur, "gemini"))
        row = doctor.check_judge_cost(ctx)
        assert row.name == "judge cost" and row.status == "ok" and "output: allowance" in row.found

        # the input estimate is the judge's own pre-call estimate (the rate limiter's) for the same requests
        judge = make_gemini(ws.config, ws.root)
        items = [JudgeItem(r["prompt_id"], r["question"], r["image_path"], r["image_id"],
                           tuple(CandidateText(c["candidate_id"], c["text"]) for c in r["candidates"]))
                 for r in jstore.candidates_to_judge(cur, 1, "gemini", judge.version, str(ws.root),
                                                     whole_prompt=True)]
        judged = sum(judge._prepare(it, judge._key(it)).est_tokens for it in items)
        guide = rubric.labelling_guide()
        # not generated yet: k=2 x 2 views = 4 answers at 16 tokens x 4 characters
        pending = estimate_tokens(guide + rubric.build_user_prompt("Not generated yet?", ["x" * 64] * 4),
                                  (800, 600))
        est = estimate(inputs, ws.config.judges.gemini, ws.config.generation)
        assert est.prompts == 4 and est.tokens_in == judged + pending
        assert est.online_usd == pytest.approx(est.tokens_in / 1e6 * 2.0 + est.tokens_out / 1e6 * 10.0)
        assert est.batch_usd == pytest.approx(est.online_usd / 2)
        assert f"online ~${est.online_usd:.4f}, batch ~${est.batch_usd:.4f}" in row.found

        # once replies are stored, their measured output replaces the allowance
        run_judge(ws, "gemini")
        measured = judge_usage.measured_tokens(ws.cursor(), "gemini")
        assert measured["candidates"] == 9 and measured["tokens_out"] > 0
        ctx.judge_measured = measured
        assert "output: measured on 9 candidates" in doctor.check_judge_cost(ctx).found
        ws.close()
    no_gemini = doctor.Context(config=cfgmod.WorkspaceConfig(), root=tmp_path, policy_path="")
    skipped = doctor.check_judge_cost(no_gemini)
    assert skipped.status == "skip"
