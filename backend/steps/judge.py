"""The judge step (owner side): find unjudged candidates, run a judge, ingest its verdicts in one transaction.

``run_judge(ws, "reference")`` builds one JudgeItem per prompt of the round whose candidates have no
judgment yet from that judge and version, runs the judge, and writes every verdict (judgments and
pairwise verdicts) in ONE transaction. What the judge is comes from its declared ``traits``
(``annotators.base.JudgeTraits``). Judges run in the owner; the model of a judge whose traits say
``runs_model_job`` (the critic) runs as the critic job (``backend.jobs.critic``) in the step's run
folder, which this step starts and plugs into the judge as ``hooks.run_model``: the judge builds the
requests and parses the replies. A judge whose traits say ``deferred`` (gemini in batch mode) is
prepared before the step starts: it submits its requests or polls them, and raises ``core.errors.Waiting``
while they run (the round stops and `round resume` comes back here). A second run with nothing new judges
nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from annotators.base import (
    METRICS,
    CandidateScore,
    CandidateText,
    Judge,
    JudgeItem,
    ModelReply,
    ModelRequest,
    ModelRunner,
    Verdict,
)
from annotators.registry import make_judge
from backend import models
from backend.job_runner import EventHandler, Job, python_module, write_config
from backend.jobs import shards
from backend.jobs.configs import CriticJobConfig
from backend.progress import write_atomic
from backend.steps.common import step_dir, tracked_step
from core import config as cfgmod
from core.config import WorkspaceConfig
from core.errors import UsageError
from storage import judgments as jstore
from storage import review_queue, rounds
from storage.workspace import Workspace

log = logging.getLogger(__name__)

CHUNK = 256
"""In-process judges without their own progress hook get items in chunks of this size."""


def verdict_rows(items: Sequence[JudgeItem], verdicts: Sequence[Verdict], judge: str,
                 judge_version: str) -> tuple[list[dict], list[dict]]:
    """Judgment rows (one per CandidateScore) and pairwise rows for ``storage.judgments.write_judgments``.

    A verdict's latency and tokens are shared evenly among its candidates' rows (one call may have
    rated them all); its raw output is kept on every row, the per-candidate reasoning on each (else
    the verdict's reasoning, else its error). A failed verdict without scores still gets one row per
    candidate, with the verdict's status, so it is not judged again unless asked. An ``ok`` verdict
    without scores (the reference judge on a prompt without a reference) stores nothing.
    """
    jrows, prows = [], []
    for item, v in zip(items, verdicts):
        scores = v.scores
        if not scores and v.status != "ok":
            scores = [CandidateScore(c.candidate_id, status=v.status) for c in item.candidates]
        n = max(len(scores), 1)
        for s in scores:
            jrows.append({
                "judgment_id": jstore.judgment_id(s.candidate_id, judge, judge_version),
                "candidate_id": s.candidate_id, "judge": judge, "judge_version": judge_version,
                **{m: getattr(s, m) for m in METRICS}, "score": s.score, "overall": s.overall,
                "reasoning": s.reasoning or v.reasoning or (v.error if s.status != "ok" else None),
                "raw_output": v.raw_output, "status": s.status,
                "latency_ms": None if v.latency_ms is None else v.latency_ms / n,
                "tokens_in": None if v.tokens_in is None else round(v.tokens_in / n),
                "tokens_out": None if v.tokens_out is None else round(v.tokens_out / n),
            })
        for p in v.pairwise:
            prows.append({"judge": judge, "judge_version": judge_version, "first_id": p.first_id,
                          "second_id": p.second_id, "winner": p.winner, "status": p.status,
                          "raw_output": p.raw_output})
    return jrows, prows


def _items(rows: list[dict]) -> list[JudgeItem]:
    return [JudgeItem(prompt_id=r["prompt_id"], question=r["question"], image_path=r["image_path"],
                      image_id=r["image_id"], reference=r["reference"],
                      candidates=tuple(CandidateText(c["candidate_id"], c["text"]) for c in r["candidates"]))
            for r in rows]


def critic_model_path(root: Path, name: str) -> str:
    """The critic's loadable folder or hub id (builds `tiny`/`demo` into checkpoints/critic-<name> once)."""
    models.check_model_name(name)
    if name in models.BUILTIN:
        return str(models.materialize(name, root / "checkpoints" / f"critic-{name}"))
    return str(models.materialize(name, root))


def critic_job_runner(root: Path, config: WorkspaceConfig, judge_version: str, run_dir: Path,
                      on_event: EventHandler | None = None) -> ModelRunner:
    """``hooks.run_model`` for the critic: its requests are answered by the critic job in ``run_dir``. A job
    killed half way leaves its answered batches as shards, which the next run on the same requests and
    config reuses (``backend.jobs.shards``); they go once the step has stored the verdicts."""

    def run(requests: Sequence[ModelRequest]) -> list[ModelReply]:
        from backend.jobs import critic as critic_job  # the job module imports the engines (torch)

        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / critic_job.OUTPUT).unlink(missing_ok=True)
        pq.write_table(pa.Table.from_pylist([{"request_id": r.request_id, "image_path": r.image_path,
                                              "text": r.text} for r in requests]), run_dir / critic_job.REQUESTS)
        device = models.default_device()
        job = CriticJobConfig(model_path=critic_model_path(root, config.judges.critic.model),
                              device=device, dtype=models.resolve_dtype(config.policy.dtype, device),
                              tensor_parallel_size=config.policy.tensor_parallel_size,
                              batch_size=config.generation.batch_size, judge_version=judge_version,
                              critic=config.judges.critic)
        write_config(run_dir, job.model_dump())
        kept = shards.resume(run_dir, critic_job.REQUESTS, ("request_id",))
        if kept:
            message = f"resuming: {kept} of {len(requests)} critic requests already done by an interrupted job"
            log.info(message)
            if on_event is not None:
                on_event({"event": "log", "message": message})
        Job(python_module("backend.jobs.critic", str(run_dir)), run_dir, on_event=on_event).wait()
        return [ModelReply(**row) for row in critic_job.read_replies(run_dir)]

    return run


def plug_model_job(judge: Judge, root: Path, config: WorkspaceConfig, run_dir: Path,
                   on_event: EventHandler | None = None) -> None:
    """Give a judge whose traits say ``runs_model_job`` the critic job, in ``run_dir``, as ``hooks.run_model``."""
    if judge.traits.runs_model_job:
        judge.hooks.run_model = critic_job_runner(root, config, judge.version, run_dir, on_event)


def _run(judge: Judge, items: list[JudgeItem], on_event: EventHandler) -> list[Verdict]:
    """Run a judge on items, reporting progress; check the contract (same length and order)."""
    total = len(items)
    if judge.traits.runs_model_job:  # the job reports its own progress (critic requests)
        verdicts = list(judge.judge(items))
    elif judge.traits.reports_progress:  # e.g. gemini: progress per finished prompt
        on_event({"event": "progress", "done": 0, "total": total, "unit": "prompts"})
        judge.hooks.on_progress = lambda done, n: on_event({"event": "progress", "done": done, "total": n,
                                                            "unit": "prompts"})
        verdicts = list(judge.judge(items))
    else:
        on_event({"event": "progress", "done": 0, "total": total, "unit": "prompts"})
        verdicts = []
        for start in range(0, total, CHUNK):
            verdicts.extend(judge.judge(items[start:start + CHUNK]))
            on_event({"event": "progress", "done": len(verdicts), "total": total, "unit": "prompts"})
    if len(verdicts) != total or any(v.prompt_id != i.prompt_id for v, i in zip(verdicts, items)):
        raise UsageError(f"judge {judge.name} broke the judge contract: {len(verdicts)} verdicts for {total} "
                         "items, or not in the same order; nothing was stored")
    return verdicts


def run_judge(ws: Workspace, judge_name: str, *, round_id: int | None = None, limit: int | None = None,
              retry_invalid: bool = False, mode: str | None = None,
              on_event: EventHandler | None = None) -> dict:
    """Judge the round's candidates not yet judged by ``judge_name`` at its current version; a summary.

    ``mode`` picks the critic's mode (rubric, pointwise, pairwise) instead of ``judges.critic.mode``.
    ``limit`` caps the number of prompts. ``retry_invalid`` judges invalid/error rows again.
    """
    on_event = on_event or (lambda e: None)
    cur = ws.cursor()
    if round_id is None:
        round_id = rounds.current_round(cur)["round_id"]
    elif rounds.get_round(cur, round_id) is None:
        raise UsageError(f"round {round_id} does not exist in {ws.root}")
    config = ws.config
    if mode is not None:
        if judge_name != "critic":
            raise UsageError(f"--mode applies to the critic judge only, not {judge_name!r}")
        config = cfgmod.update(config, {"judges.critic.mode": mode})
    judge = make_judge(judge_name, config, ws.root)
    version = judge.version
    rows = jstore.candidates_to_judge(cur, round_id, judge_name, version, str(ws.root), retry_invalid=retry_invalid,
                                      whole_prompt=not judge.traits.per_candidate, limit=limit)
    summary = {"round_id": round_id, "judge": judge_name, "judge_version": version, "prompts": 0,
               "candidates": 0, "ok": 0, "invalid": 0, "error": 0, "skipped_no_reference": 0,
               "pairwise_verdicts": 0}
    if judge.traits.requires_reference:
        with_ref = [r for r in rows if r["reference"] is not None and r["reference"].strip()]
        summary["skipped_no_reference"] = len(rows) - len(with_ref)
        rows = with_ref
    if not rows:
        summary["message"] = (f"nothing to judge: every candidate of round {round_id} already has a "
                              f"{judge_name} ({version}) judgment"
                              + (f"; {summary['skipped_no_reference']} prompt(s) have no reference answer"
                                 if summary["skipped_no_reference"] else ""))
        return summary
    step = f"judge-{judge_name}" + (f"-{judge.traits.variant}" if judge.traits.variant else "")
    run_dir = step_dir(ws, round_id, step)
    items = _items(rows)
    plug_model_job(judge, ws.root, config, run_dir, on_event)
    if judge.traits.deferred:  # gemini in batch mode: submit or poll; raises core.errors.Waiting until ready
        judge.prepare(items, run_dir)
    started = time.perf_counter()
    with tracked_step(ws, round_id, step, run_dir):
        verdicts = _run(judge, items, on_event)
        jrows, prows = verdict_rows(items, verdicts, judge_name, version)
        jstore.write_judgments(cur, jrows, prows)
        shards.discard(run_dir)  # the critic job's, once its verdicts are stored (one transaction)
        review_queue.refresh_queue(cur, round_id, config.pairs.judge)
        for r in jrows:
            summary[r["status"]] += 1
        summary.update(prompts=len(items), candidates=len(jrows), pairwise_verdicts=len(prows),
                       seconds=round(time.perf_counter() - started, 2))
        write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
        rounds.finish_step(cur, round_id, step, "done", summary=summary)
    log.info("judge %s %s: %s", judge_name, version, summary)
    return summary
