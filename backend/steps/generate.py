"""The generate step (owner side): pick prompts, write the run folder, run the job, ingest candidates.

The run folder is kept between attempts: when a killed step runs again (``round resume``) on the same
prompts and config, the job finds the shards of the killed attempt and generates only the prompts they
lack (``backend.jobs.shards``); other inputs or config start fresh. The shards go once ingested.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from backend.job_runner import CancelCheck, EventHandler, Job, python_module, write_config
from backend.jobs import shards
from backend.jobs.configs import GenerateJobConfig
from backend.models import default_device, resolve_dtype
from backend.steps.common import checkpoint_path, step_dir, tracked_step
from core import config as cfgmod
from core import steerlm
from storage import generation, review_queue, rounds
from storage.workspace import Workspace

log = logging.getLogger(__name__)


def run_generate(ws: Workspace, *, overrides: dict[str, Any] | None = None, limit: int | None = None,
                 prompt_ids: list[str] | None = None, split: str = "train",
                 on_event: EventHandler | None = None, round_id: int | None = None,
                 checkpoint_id: str | None = None, eval_origin: bool = False,
                 cancel: CancelCheck | None = None) -> dict:
    """k candidates per prompt of the current round from its policy checkpoint; returns a summary.

    The eval step calls it with ``checkpoint_id`` (c(r) or c(r-1)), ``split="heldout"`` and
    ``eval_origin=True``: those answers are stored with origin `eval` and never paired. A checkpoint trained
    with ``train.method = "steerlm"`` is asked for the best answers: its recorded attribute values are appended
    to every question it gets (``core.steerlm``; the job's prompts.parquet holds the questions as asked)."""
    cur = ws.cursor()
    rnd = rounds.current_round(cur) if round_id is None else rounds.get_round(cur, round_id)
    round_id = rnd["round_id"]
    ckpt_id = checkpoint_id or rnd["policy_checkpoint_id"]
    gen = cfgmod.update(ws.config, {f"generation.{k}": v for k, v in (overrides or {}).items() if v is not None}).generation
    todo = generation.prompts_to_generate(cur, round_id, ckpt_id, str(ws.root), split=split, limit=limit,
                                          prompt_ids=prompt_ids, eval_origin=eval_origin)
    if not todo:
        return {"round_id": round_id, "prompts": 0, "candidates": 0,
                "message": f"nothing to generate: every {split} prompt already has candidates from {ckpt_id} "
                           f"in round {round_id}"}
    suffix = steerlm.question_suffix(rounds.checkpoint_meta(cur, ckpt_id))
    if suffix:
        todo = [{**row, "question": row["question"] + suffix} for row in todo]
    step = f"eval-generate-{ckpt_id}" if eval_origin else "generate"
    run_dir = step_dir(ws, round_id, step)
    pq.write_table(pa.Table.from_pylist(todo), run_dir / "prompts.parquet")
    (run_dir / "candidates.parquet").unlink(missing_ok=True)
    device = default_device()
    policy = ws.config.policy.model_copy(update={"dtype": resolve_dtype(ws.config.policy.dtype, device)})
    config = GenerateJobConfig(model_path=str(checkpoint_path(ws, ckpt_id)), adapter_path=None,
                               device=device, round_id=round_id, checkpoint_id=ckpt_id,
                               policy=policy, generation=gen)
    write_config(run_dir, config.model_dump())
    kept = shards.resume(run_dir, "prompts.parquet", ("prompt_id", "view"))
    if kept:
        message = (f"resuming: {kept} of {len(todo) * len(gen.views)} prompts (x views) already done by an "
                   f"interrupted {step} job with the same prompts and config")
        log.info(message)
        if on_event is not None:
            on_event({"event": "log", "message": message})
    with tracked_step(ws, round_id, step, run_dir):
        result = Job(python_module("backend.jobs.generate", str(run_dir)), run_dir, on_event=on_event,
                     cancel=cancel).wait()
        added = generation.ingest_candidates_parquet(cur, run_dir / "candidates.parquet",
                                                     origin="eval" if eval_origin else None)
        shards.discard(run_dir)  # ingested (one transaction): a later run of the step has other prompts
        if not eval_origin:
            review_queue.refresh_queue(cur, round_id, ws.config.pairs.judge)
        summary = {"round_id": round_id, "checkpoint_id": ckpt_id, "prompts": len(todo), "candidates": added,
                   "seconds": round(result.seconds, 1), **{f"job_{k}": v for k, v in result.summary.items()}}
        rounds.finish_step(cur, round_id, step, "done", summary=summary)
    return summary
