"""Resumable generate and critic jobs: shards on disk, kill -9 half way, resume, same candidates."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.cli import main as cli_main
from backend import progress
from backend.jobs import shards
from tests.helpers import REPO, make_image, make_ws, q, wait_for_job, wait_until, write_generate_run

VIEWS = ["original", "aug:hflip"]


def run_in_process(main, run_dir: Path, monkeypatch) -> list[dict]:
    """Run a job's ``main`` here (the model loads once per call, no interpreter start) and return its events."""
    out = io.StringIO()
    monkeypatch.setattr(progress, "_OUT", out)
    assert main([str(run_dir)]) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def shard_files(run_dir: Path) -> list[Path]:
    return sorted((run_dir / shards.SHARDS).glob("*/*.parquet"))


def test_generate_job_regenerates_only_missing_and_torn_shards(tiny_model_dir, tmp_path, monkeypatch):
    from backend.jobs.generate import OUTPUT
    from backend.jobs.generate import main as generate_main

    run_dir = write_generate_run(tmp_path / "run", tiny_model_dir, n_prompts=6, batch_size=2, views=VIEWS)
    first = run_in_process(generate_main, run_dir, monkeypatch)[-1]["summary"]
    assert (first["resumed_prompts"], first["generated_prompts"], first["ignored_shards"]) == (0, 12, 0)
    full = pq.read_table(run_dir / OUTPUT).to_pylist()
    files = shard_files(run_dir)
    assert len(files) == 6  # 3 batches of 2 prompts per view, one shard each

    # as after a kill: the output and two shards missing, one shard torn (cut short)
    (run_dir / OUTPUT).unlink()
    files[1].unlink()
    files[4].unlink()
    files[2].write_bytes(files[2].read_bytes()[:100])
    events = run_in_process(generate_main, run_dir, monkeypatch)
    summary = events[-1]["summary"]
    assert (summary["resumed_prompts"], summary["generated_prompts"], summary["ignored_shards"]) == (6, 6, 1)
    assert any("resuming: 6 of 12 prompts already done (3 shard(s) kept, 1 unreadable" in e.get("message", "")
               for e in events)
    assert [e["done"] for e in events if e["event"] == "progress"] == [6, 8, 10, 12]
    assert pq.read_table(run_dir / OUTPUT).to_pylist() == full  # same rows, same order, same texts and seeds
    assert len(shard_files(run_dir)) == 6

    # other inputs (another seed): the old shards are not used; the owner's resume() drops them
    config = json.loads((run_dir / "config.json").read_text())
    config["generation"]["seed"] = 8
    (run_dir / "config.json").write_text(json.dumps(config))
    assert shards.resume(run_dir, "prompts.parquet", ("prompt_id", "view")) == 0
    assert shard_files(run_dir) == []
    summary = run_in_process(generate_main, run_dir, monkeypatch)[-1]["summary"]
    assert (summary["resumed_prompts"], summary["generated_prompts"]) == (0, 12)
    assert shards.resume(run_dir, "prompts.parquet", ("prompt_id", "view")) == 12


def test_critic_job_reuses_a_shard_on_disk(tiny_model_dir, tmp_path, monkeypatch):
    from backend.jobs.configs import CriticJobConfig
    from backend.jobs.critic import OUTPUT, REQUESTS, SCHEMA
    from backend.jobs.critic import main as critic_main
    from core.config import CriticConfig

    run_dir = tmp_path / "critic"
    image = str(make_image(run_dir / "img.png").resolve())
    requests = [{"request_id": f"r{i}", "image_path": image, "text": f"Rate answer {i} from 0 to 100."}
                for i in range(5)]
    pq.write_table(pa.Table.from_pylist(requests), run_dir / REQUESTS)
    config = CriticJobConfig(model_path=str(tiny_model_dir), batch_size=2,
                             critic=CriticConfig(max_new_tokens=6))
    (run_dir / "config.json").write_text(json.dumps(config.model_dump()))
    summary = run_in_process(critic_main, run_dir, monkeypatch)[-1]["summary"]
    assert (summary["resumed_requests"], summary["generated_requests"]) == (0, 5)
    full = pq.read_table(run_dir / OUTPUT).to_pylist()

    # a killed attempt answered batch 1 (r2, r3): its shard is used as is, the other batches run again
    shards.discard(run_dir)
    (run_dir / OUTPUT).unlink()
    key = shards.run_key(run_dir, REQUESTS)
    seeded = [{"request_id": f"r{i}", "text": f"kept {i}", "num_tokens": 2, "latency_ms": 1.0,
               "finish_reason": "stop"} for i in (2, 3)]
    shards.ShardStore.open(run_dir, key, SCHEMA).write(1, seeded)
    assert shards.resume(run_dir, REQUESTS, ("request_id",)) == 2
    events = run_in_process(critic_main, run_dir, monkeypatch)
    summary = events[-1]["summary"]
    assert (summary["resumed_requests"], summary["generated_requests"], summary["ignored_shards"]) == (2, 3, 0)
    replies = pq.read_table(run_dir / OUTPUT).to_pylist()
    assert [r["request_id"] for r in replies] == [f"r{i}" for i in range(5)]
    assert [r["text"] for r in replies] == [full[0]["text"], full[1]["text"], "kept 2", "kept 3", full[4]["text"]]


# ---- a round's generate job killed half way ---------------------------------------------------------------

PROMPTS = 24
ROUND = {"round.eval_judge": None, "review.required": "required", "review.quota": 1, "generation.batch_size": 1,
         "generation.max_new_tokens": 32, "generation.views": VIEWS}
"""Stops at the review gate right after generation; one prompt per engine call: 48 shards."""


def many_prompts(root: Path) -> Path:
    data = root / "data"
    rows = []
    for i in range(PROMPTS):
        make_image(data / f"img{i}.png", size=(40 + i % 5, 36), color=(40 * i % 255, 90, 200 - 7 * i))
        rows.append({"image": f"img{i}.png", "question": f"What colour is shape {i}?"})
    (data / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return data / "q.jsonl"


def candidates(ws: Path) -> list[tuple]:
    return q(ws, "SELECT candidate_id, prompt_id, view, sample_index, seed, text FROM candidates "
                 "WHERE round_id = 1 ORDER BY candidate_id")


def job_summary(ws: Path) -> dict:
    return json.loads(q(ws, "SELECT summary FROM round_steps WHERE round_id = 1 AND step = 'generate'")[0][0])


@pytest.mark.slow
def test_kill9_generate_half_way_then_resume_generates_only_the_rest(tmp_path, tiny_model_dir):
    data = many_prompts(tmp_path)
    ref = make_ws(tmp_path / "ref", tiny_model_dir, data=data, **ROUND)
    assert cli_main(["round", "start", "-w", str(ref), "--rounds", "1", "--quiet"]) == 0
    total = PROMPTS * len(VIEWS)
    assert job_summary(ref)["job_generated_prompts"] == total

    ws = make_ws(tmp_path / "killed", tiny_model_dir, data=data, **ROUND)
    run_dir = ws / "runs" / "r001" / "generate"
    owner = subprocess.Popen([sys.executable, "-m", "app.cli", "round", "start", "-w", str(ws), "--rounds", "1",
                              "--quiet"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    job = wait_for_job(owner, "backend.jobs.generate", timeout=300)
    wait_until(lambda: len(shard_files(run_dir)) >= total // 2, 120, "half of the generate job's shards")
    job.send_signal(signal.SIGKILL)
    owner.wait(120)
    assert owner.returncode != 0
    kept = len(shard_files(run_dir))  # one prompt (and view) per shard
    assert total // 2 <= kept < total, f"the kill landed after the job had finished ({kept} shards)"
    assert q(ws, "SELECT count(*) FROM candidates")[0][0] == 0  # nothing ingested: one transaction

    assert cli_main(["round", "resume", "-w", str(ws), "--quiet"]) == 0
    summary = job_summary(ws)
    assert (summary["job_resumed_prompts"], summary["job_generated_prompts"]) == (kept, total - kept)
    assert "resuming: " in (run_dir / "job.log").read_text()
    assert candidates(ws) == candidates(ref)
    assert len(candidates(ws)) == PROMPTS * 3  # k=2 samples + one hflip answer per prompt
    assert not (run_dir / shards.SHARDS).exists()  # ingested: the shards are gone
