"""The train step (owner side): freeze the round's pairs, write the run folder (the pairs, or for
``train.method = "steerlm"`` the candidates scored by ``pairs.judge``), run the training job (one process or
the deepspeed launcher), and ingest metrics + the new checkpoint in one transaction."""

from __future__ import annotations

import hashlib
import json
import shutil
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from backend import launch
from backend.job_runner import CancelCheck, EventHandler, Job, job_env, write_config
from backend.jobs.configs import TRAIN_INPUT, TrainJobConfig
from backend.models import default_device, resolve_dtype
from backend.steps.common import checkpoint_path, step_dir, tracked_step
from core import config as cfgmod
from core import steerlm
from core.errors import UsageError
from storage import judgments, rounds
from storage import pairs as pairstore
from storage.workspace import Workspace


def pairs_hash(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r["prompt_id"], r["chosen_id"], r["rejected_id"], r["chosen_text"],
                             r["rejected_text"]]).encode())
    return h.hexdigest()[:16]


def scored_hash(rows: list[dict]) -> str:
    """steerlm's counterpart of pairs_hash: the scored candidates, their answers and values."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r["candidate_id"], r["text"], *(r[a] for a in steerlm.ATTRIBUTES)]).encode())
    return h.hexdigest()[:16]


def steerlm_rows(ws: Workspace, round_id: int) -> list[dict]:
    """SteerLM's input: the round's candidates scored by ``pairs.judge`` on the five HelpSteer attributes."""
    judge = ws.config.pairs.judge
    if judge is None:
        raise UsageError('train.method = "steerlm" trains on candidates scored on the five HelpSteer attributes: '
                         'set pairs.judge to such a judge (gemini, or critic with judges.critic.mode = "rubric")')
    rows = judgments.scored_candidates(ws.cursor(), round_id, judge, str(ws.root))
    if not rows:
        raise UsageError(f"round {round_id} has no candidates that pairs.judge = {judge!r} rated on the five "
                         f"HelpSteer attributes: run `prefloop judge --judge {judge}` first (the critic only in "
                         "judges.critic.mode = \"rubric\")")
    return rows


def run_train(ws: Workspace, *, overrides: dict[str, Any] | None = None, on_event: EventHandler | None = None,
              open_next: bool = True, cancel: CancelCheck | None = None) -> dict:
    """Train the current round: c(r-1) + frozen pairs -> c(r). Returns a summary."""
    cur = ws.cursor()
    rnd = rounds.current_round(cur)
    round_id, parent_id = rnd["round_id"], rnd["policy_checkpoint_id"]
    train = cfgmod.update(ws.config, {f"train.{k}": v for k, v in (overrides or {}).items() if v is not None}).train
    if train.method != "steerlm" and pairstore.count(cur, round_id) == 0:
        raise UsageError(f"round {round_id} has no pairs to train on: run `prefloop pairs` first "
                         "(after `prefloop generate`, or import candidates with preferences)")
    train = launch.resolve_train(train)  # "auto" -> the GPUs seen; stops here when asking for too many
    if train.method == "steerlm":  # SteerLM learns from every scored candidate, not from the pairs
        rows = steerlm_rows(ws, round_id)
        input_hash = scored_hash(rows)
    else:
        rows = pairstore.training_rows(cur, round_id, str(ws.root))
        input_hash = pairs_hash(rows)
    pairstore.freeze(cur, round_id)
    run_dir = step_dir(ws, round_id, "train", fresh=True)
    pq.write_table(pa.Table.from_pylist(rows), run_dir / TRAIN_INPUT[train.method])
    checkpoint_id = f"c{round_id}"
    out_dir = ws.lay.checkpoints / f"r{round_id:03d}"
    if out_dir.exists():  # a failed or killed attempt; never registered in the database
        shutil.rmtree(out_dir)
    ref_id = parent_id if train.reference == "previous" else rounds.BASE_CHECKPOINT
    base = rounds.get_checkpoint(cur, rounds.BASE_CHECKPOINT)
    device = default_device()
    config = TrainJobConfig(
        model_path=str(checkpoint_path(ws, parent_id)), ref_model_path=str(checkpoint_path(ws, ref_id)),
        output_dir=str(out_dir), round_id=round_id, checkpoint_id=checkpoint_id, parent_id=parent_id,
        base_model=base["base_model"], pairs_hash=input_hash, device=device,
        dtype=resolve_dtype(ws.config.policy.dtype, device), train=train,
        image_processor=ws.config.policy.image_processor,
        # beside the run folder, which every attempt recreates: a retry reuses the reference log-probs
        ref_cache_dir=str(ws.lay.round_dir(round_id) / "ref_cache"))
    write_config(run_dir, config.model_dump())
    argv = launch.train_command(run_dir, train)
    launch.write_rank_env(run_dir, train, job_env(processes=train.num_processes))  # multi-node only
    with tracked_step(ws, round_id, "train", run_dir):
        result = Job(argv, run_dir, on_event=on_event, cancel=cancel, processes=train.num_processes,
                     parse=launch.event_parser(train)).wait()
        meta = json.loads((out_dir / "meta.json").read_text())
        rounds.complete_training(cur, round_id=round_id, metrics=result.metrics, open_next=open_next, checkpoint={
            "checkpoint_id": checkpoint_id, "round_id": round_id, "parent_id": parent_id,
            "base_model": base["base_model"], "path": str(out_dir.relative_to(ws.root)),
            "kind": meta.get("kind", "merged"), "meta": meta})
        summary = {"round_id": round_id, "checkpoint_id": checkpoint_id, "parent_id": parent_id, "pairs": len(rows),
                   "seconds": round(result.seconds, 1), "steps": len(result.metrics), **result.summary}
        rounds.finish_step(cur, round_id, "train", "done", summary=summary)
    return summary
