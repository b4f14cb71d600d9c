"""The training job: ``python -m backend.jobs.train RUN_DIR`` (or one rank of the deepspeed launcher).

``train.method`` picks the builder of the trainer, in one place (``METHODS``): ``dpo`` (backend.dpo), or the
Li/Lin/Pei baselines ``sft`` (rejection sampling) and ``steerlm`` on TRL's SFTTrainer (backend.sft); setup,
LoRA, launcher, merge, output layout, meta.json and metrics.jsonl are the same for all three.
In RUN_DIR: ``config.json`` (``backend.jobs.configs.TrainJobConfig``: the paths and ids of the round,
``device`` and ``dtype``, and the workspace's ``core.config.TrainConfig`` nested as ``train``) and the method's
input (``configs.TRAIN_INPUT``): ``pairs.parquet`` for dpo and sft (prompt_id, chosen_id, rejected_id,
image_path, question, chosen_text, rejected_text), ``scored.parquet`` for steerlm (``sft.SCORED_COLUMNS``).
With ``ref_cache_dir`` set, each pair's reference log-probs are looked up in that folder first
(``backend.ref_cache``) and the missing ones are appended as they are computed; when every pair is
cached the reference model is not even loaded (with LoRA the reference is the policy with its
adapter disabled, so that saves the forward passes, not memory).
Out: the checkpoint folder ``output_dir`` (written as ``<output_dir>.tmp`` then renamed) holding the
weights (LoRA adapter, full weights, or merged weights with the adapter kept in ``adapter/``), the
processor, ``meta.json`` (with ``method``; a steerlm checkpoint also the conditioning it asks for at
generation, ``steerlm``) and ``train_config.json``; and ``RUN_DIR/metrics.jsonl`` (one row per step).
stdout carries only the JSON-lines job protocol (backend.progress); library output goes to stderr.
Under deepspeed only rank 0 speaks and writes; the LoRA merge runs in a fresh process (backend.jobs.merge).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from backend import dpo, ref_cache, sft
from backend.jobs.common import check_run_dir, read_input
from backend.jobs.configs import TRAIN_INPUT, TrainJobConfig, load_job_config
from backend.progress import emit, parse_line, write_atomic
from backend.progress import log as log_event
from core import steerlm
from core.config import TrainConfig
from core.errors import JobFailed, PrefloopError

log = logging.getLogger(__name__)

PAIR_COLUMNS = ("prompt_id", "chosen_id", "rejected_id", "image_path", "question", "chosen_text", "rejected_text")
DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"
VERSIONED = ("torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "datasets")
DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "CROSS_RANK", "CROSS_SIZE",
                   "MASTER_ADDR", "MASTER_PORT")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m backend.jobs.train", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="folder with config.json and pairs.parquet")
    # the deepspeed launcher appends --local_rank=N; the rank is read from the environment instead
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def library_versions() -> dict[str, str | None]:
    found = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


def same_folder(a: str, b: str | None) -> bool:
    return b is None or Path(a).resolve() == Path(b).resolve()


def prepare_output(output_dir: Path, checkpoint_id: str) -> Path:
    """The staging folder; refuses to replace an output folder of another checkpoint."""
    if output_dir.exists():
        meta = output_dir / "meta.json"
        owner = json.loads(meta.read_text()).get("checkpoint_id") if meta.is_file() else None
        if owner != checkpoint_id:
            raise JobFailed(f"output folder {output_dir} already exists and is not checkpoint {checkpoint_id}; "
                            "remove it or choose another output_dir")
    staging = output_dir.with_name(output_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def run_merge(adapter_dir: Path, base: str, out: Path, dtype: str, *, fresh_process: bool) -> None:
    """backend.jobs.merge: here after a single-process run (its libraries are loaded already: a fresh
    interpreter would spend seconds importing them again), in a fresh process after a distributed one
    (merging inside a ZeRO-3 training process fails)."""
    if not fresh_process:
        from backend.jobs.merge import merge

        try:
            merge(adapter_dir, base, out, dtype)
        except Exception as err:  # one line for the owner, as from the fresh process
            reason = str(err) if isinstance(err, PrefloopError) else f"{type(err).__name__}: {err}"
            raise JobFailed(f"merging the LoRA adapter failed: {reason}") from err
        return
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV and not k.startswith("ACCELERATE_")}
    cmd = [sys.executable, "-m", "backend.jobs.merge", "--adapter", str(adapter_dir), "--base", base,
           "--out", str(out), "--dtype", dtype]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    sys.stderr.write(result.stderr)
    if result.returncode != 0:
        errors = [e["message"] for e in map(parse_line, result.stdout.splitlines()) if e["event"] == "error"]
        reason = errors[-1] if errors else (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise JobFailed(f"merging the LoRA adapter failed (exit {result.returncode}): {reason}")


def no_pairs_message(stats, train: TrainConfig) -> str:
    return (f"no pairs to train on: {stats.total} pair(s) given, {stats.skipped['identical']} with identical "
            f"answers, {stats.skipped['too_long']} longer than max_length={train.max_length} tokens "
            "(set train.max_length = \"auto\" or raise it, or lower train.max_completion_length)")


def open_ref_cache(job: TrainJobConfig, processor) -> tuple[ref_cache.RefLogpCache | None, dpo.RefKeyFn | None]:
    """The job's reference log-prob cache and its key function, or (None, None) without a cache folder."""
    if not job.ref_cache_dir:
        return None, None
    reference = ref_cache.resolve_model_folder(job.ref_model_path or job.model_path)
    if reference is None:
        log_event(f"reference log-prob cache off: {job.ref_model_path or job.model_path} is not a local folder")
        return None, None
    context = ref_cache.make_context(reference, processor, dtype=job.dtype, max_length=job.train.max_length,
                                     max_completion_length=job.train.max_completion_length)
    cache = ref_cache.RefLogpCache(job.ref_cache_dir)
    return cache, context.row_key


# ---- the methods: each builds its Trainer arguments, dataset, model(s) and trainer ------------------------

@dataclass(frozen=True)
class Setup:
    """What the job hands a method's builder."""

    job: TrainJobConfig
    rows: list[dict]
    """The run's input rows (``TRAIN_INPUT[train.method]``)."""
    processor: Any
    ds_config: Path | None
    """The shipped DeepSpeed config under the deepspeed launcher, else None."""
    trainer_dir: Path
    """The Trainer's own output_dir (removed at cleanup)."""
    metrics_path: Path


@dataclass
class Prepared:
    """A method's trainer, ready to train, and what the job logs and records about it."""

    trainer: Any
    args: Any
    """Its TrainingArguments (world size, DeepSpeed plugin, output_dir)."""
    stats: dpo.PairStats
    """Examples (pairs for dpo) given, used, skipped."""
    what: str
    """The method as the job's log names it, e.g. "DPO, loss sigmoid"."""
    loaded: str
    """The log line of the model loading, e.g. "loaded policy in 1.2 s"."""
    report: Callable[[], dict]
    """Called after training: the method's own entries for meta.json and the summary."""


def log_used(stats: dpo.PairStats, train: TrainConfig, unit: str) -> None:
    log_event(f"{stats.used} of {stats.total} {unit} used, skipped {stats.skipped}, "
              f"{stats.truncated_answers} answers capped at {train.max_completion_length} tokens, "
              f"longest sequence {stats.longest} tokens")


def prepare_dpo(s: Setup) -> Prepared:
    """DPO on the pairs, against the reference policy (its log-probs from the cache when there is one)."""
    from backend.models import load_model

    job, cfg = s.job, s.job.train
    args = dpo.dpo_config(cfg, output_dir=s.trainer_dir, device=job.device, dtype=job.dtype,
                          max_steps=job.max_steps, deepspeed_config=s.ds_config)
    cache, ref_key = open_ref_cache(job, s.processor)
    dataset, stats = dpo.build_dataset(s.rows, s.processor, cfg, ref_key=ref_key)
    if dataset is None:
        raise JobFailed(no_pairs_message(stats, cfg))
    log_used(stats, cfg, "pairs")
    # Every rank reads the cache here, before the (collective) model loading, and nothing is appended
    # before training starts: all ranks take the same decision.
    cached = 0 if cache is None else stats.used - len(cache.missing(set(dataset[dpo.REF_KEY])))
    all_cached = cache is not None and cached == stats.used
    # under DeepSpeed a full fine-tune still loads its reference (the stand-in cannot be partitioned)
    skip_reference = all_cached and (cfg.lora or s.ds_config is None)
    if cache is not None:
        log_event(f"reference log-probs: {cached} of {stats.used} pairs cached in {cache.folder}, "
                  f"{stats.used - cached} to compute" + ("; the reference model is not loaded" if skip_reference else ""))

    t0 = time.time()
    model = load_model(job.model_path, dtype=job.dtype)
    separate_ref = not same_folder(job.model_path, job.ref_model_path) and not skip_reference
    ref_model = load_model(job.ref_model_path, dtype=job.dtype) if separate_ref else None
    peft_config = dpo.trainable(cfg, model)
    trainer = dpo.build_trainer(model, ref_model, s.processor, dataset, args, peft_config, s.metrics_path,
                                ref_cache=cache, reference_available=not skip_reference)
    loaded = f"loaded policy{'' if ref_model is None else ' and reference'} in {time.time() - t0:.1f} s"

    def report() -> dict:
        if cache is None:
            return {}
        log_event(f"reference log-probs: {cache.stats.served} pair-steps served from the cache, "
                  f"{cache.stats.computed} pairs computed in {cache.stats.ref_forwards} reference forwards")
        return {"ref_cache": {"pairs_cached_at_start": cached, "reference_available": not skip_reference,
                              **cache.stats.as_dict()}}

    return Prepared(trainer, args, stats, f"DPO, loss {'+'.join(cfg.loss)}", loaded, report)


def prepare_sft_examples(s: Setup, examples: list[dict], what: str, report: Callable[[], dict] = dict) -> Prepared:
    """SFT (TRL's SFTTrainer) on ``examples`` (prompt_id, candidate_id, image_path, question, answer)."""
    from backend.models import load_model

    job, cfg = s.job, s.job.train
    args = sft.sft_config(cfg, output_dir=s.trainer_dir, device=job.device, dtype=job.dtype,
                          max_steps=job.max_steps, deepspeed_config=s.ds_config)
    dataset, stats = sft.build_dataset(examples, s.processor, cfg)
    if dataset is None:
        raise JobFailed(sft.no_examples_message(stats, cfg))
    log_used(stats, cfg, "examples")
    t0 = time.time()
    model = load_model(job.model_path, dtype=job.dtype)
    peft_config = dpo.trainable(cfg, model)
    trainer = sft.build_trainer(model, s.processor, dataset, args, peft_config, s.metrics_path)
    return Prepared(trainer, args, stats, what, f"loaded policy in {time.time() - t0:.1f} s", report)


def prepare_rejection_sampling(s: Setup) -> Prepared:
    """``sft``: SFT on each prompt's best answer, the chosen side of its pairs."""
    examples = sft.rejection_sampling_examples(s.rows)
    log_event(f"rejection sampling: {len(examples)} prompts' best answers from {len(s.rows)} pairs")
    return prepare_sft_examples(s, examples, "SFT (rejection sampling)")


def prepare_steerlm(s: Setup) -> Prepared:
    """``steerlm``: SFT on every scored candidate, its attribute values in the question; the checkpoint records
    the values it asks for at generation (core.steerlm)."""
    target = steerlm.generation_target(s.rows, s.job.train.steerlm_target)
    suffix = steerlm.attribute_string(target)
    log_event(f"SteerLM: {len(s.rows)} scored candidates; generation from this checkpoint asks for {suffix.strip()}")
    recorded = {"steerlm": {"format": steerlm.FORMAT, "target": target, "suffix": suffix}}
    return prepare_sft_examples(s, sft.steerlm_examples(s.rows), "SteerLM SFT", lambda: recorded)


@dataclass(frozen=True)
class Method:
    columns: tuple[str, ...]
    """Columns the method reads from its input Parquet (``TRAIN_INPUT``)."""
    prepare: Callable[[Setup], Prepared]


METHODS: dict[str, Method] = {
    "dpo": Method(PAIR_COLUMNS, prepare_dpo),
    "sft": Method(PAIR_COLUMNS, prepare_rejection_sampling),
    "steerlm": Method(sft.SCORED_COLUMNS, prepare_steerlm),
}
"""``train.method`` (``core.names.TRAIN_METHODS``) -> its input columns and builder."""


def train(run_dir: Path) -> dict:
    started = time.time()
    # ---- setup -------------------------------------------------------------------------------------
    job = load_job_config(run_dir, TrainJobConfig)
    cfg = job.train
    output_dir = Path(job.output_dir)
    for role, path in (("model_path", job.model_path), ("ref_model_path", job.ref_model_path)):
        if path and (Path(path) / "adapter_config.json").is_file():
            raise JobFailed(f"{role} {path} is a LoRA adapter folder, not full weights; train from a merged "
                            "checkpoint (train.merge = true), or merge it first with python -m backend.jobs.merge")
    main = is_main_process()
    staging = prepare_output(output_dir, job.checkpoint_id) if main else None
    metrics_path = run_dir / "metrics.jsonl"
    if main:
        metrics_path.unlink(missing_ok=True)  # a retried step starts its curve again
    method = METHODS[cfg.method]
    rows = read_input(run_dir / TRAIN_INPUT[cfg.method], method.columns, error=JobFailed)
    from transformers import set_seed  # the heavy imports come after the checks above, which fail fast

    from backend.models import load_processor

    ds_config = DS_CONFIGS / f"zero{cfg.zero_stage}.json" if cfg.launcher == "deepspeed" else None
    set_seed(cfg.seed)
    processor = load_processor(job.model_path, image_processor=job.image_processor)
    prepared = method.prepare(Setup(job, rows, processor, ds_config, run_dir / "trainer", metrics_path))
    trainer, args, stats = prepared.trainer, prepared.args, prepared.stats
    zero = f", DeepSpeed ZeRO-{args.deepspeed_plugin.zero_stage}" if args.deepspeed_plugin else ""
    log_event(f"{prepared.loaded}; {'LoRA' if cfg.lora else 'full'} {prepared.what}, "
              f"world size {args.world_size}{zero}")

    # ---- run ---------------------------------------------------------------------------------------
    trainer.train()
    train_loss = dpo.final_loss(trainer)
    steps = trainer.state.global_step

    # ---- save --------------------------------------------------------------------------------------
    kind = "full" if not cfg.lora else ("merged" if cfg.merge else "adapter")
    weights_dir = (staging / "adapter" if kind == "merged" else staging) if main else Path(args.output_dir)
    trainer.save_model(str(weights_dir))  # every rank: ZeRO-3 gathers the shards; rank 0 writes
    recorded = prepared.report()  # the method's own entries (dpo: ref_cache; steerlm: its conditioning)
    summary = {"method": cfg.method, "pairs_used": stats.used, "pairs_skipped": stats.skipped_total,
               "steps": steps, "train_loss": train_loss, "kind": kind, "output_dir": str(output_dir), **recorded}
    if main:
        (weights_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle; train_config.json records it
        processor.save_pretrained(weights_dir)
        resolved = {**job.model_dump(exclude={"train"}), **cfg.model_dump(), "world_size": args.world_size,
                    "deepspeed_config": str(ds_config) if ds_config else None}
        meta = {"checkpoint_id": job.checkpoint_id, "round_id": job.round_id, "parent_id": job.parent_id,
                "method": cfg.method, "base_model": job.base_model, "pairs_hash": job.pairs_hash, "kind": kind,
                "policy_path": job.model_path, "reference_path": job.ref_model_path or job.model_path,
                "reference": cfg.reference, "pairs_total": stats.total, "pairs_used": stats.used,
                "pairs_skipped": stats.skipped_total, "skipped": stats.skipped,
                "answers_truncated": stats.truncated_answers, "steps": steps, "train_loss": train_loss,
                "ref_cache": None, **recorded, "versions": library_versions(), "config": resolved}
        if kind == "merged":
            write_atomic(weights_dir / "meta.json", json.dumps({**meta, "kind": "adapter"}, indent=2))
            t1 = time.time()
            run_merge(weights_dir, job.model_path, staging, job.dtype,
                      fresh_process=ds_config is not None or args.world_size > 1)
            log_event(f"merged the adapter into full weights in {time.time() - t1:.1f} s")
        summary["seconds"] = round(time.time() - started, 2)
        meta["seconds"] = summary["seconds"]
        write_atomic(staging / "train_config.json", json.dumps(resolved, indent=2))
        write_atomic(staging / "meta.json", json.dumps(meta, indent=2))
        if output_dir.exists():
            shutil.rmtree(output_dir)  # a retry of this same checkpoint (checked in prepare_output)
        os.replace(staging, output_dir)

    # ---- cleanup -----------------------------------------------------------------------------------
    del trainer, prepared
    gc.collect()
    if main:
        shutil.rmtree(run_dir / "trainer", ignore_errors=True)
    summary.setdefault("seconds", round(time.time() - started, 2))
    return summary


def main(argv: list[str] | None = None) -> int:
    os.environ["HF_HUB_OFFLINE"] = "1"  # a job never downloads: every model is a local folder by now
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.stdout = sys.stderr  # library prints go to stderr; emit() keeps the real stdout for events
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        check_run_dir(args.run_dir)  # multi-node: the workspace must be on a filesystem every host mounts
        summary = train(args.run_dir)
    except PrefloopError as err:
        emit("error", message=str(err))
        return err.exit_code
    except Exception as err:  # noqa: BLE001 - the owner needs one line; the traceback goes to stderr
        traceback.print_exc()
        emit("error", message=f"training failed: {type(err).__name__}: {err}")
        return 1
    emit("done", summary=summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
