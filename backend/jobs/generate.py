"""The generate job: k candidate answers per prompt from the policy, plus SeVa augmented-view answers.

    python -m backend.jobs.generate RUN_DIR

Reads ``RUN_DIR/config.json`` (``backend.jobs.configs.GenerateJobConfig``: the workspace's
``policy`` and ``generation`` sections plus the run's paths and ids) and ``RUN_DIR/prompts.parquet``
(prompt_id, image_path, question). The ``original`` view gets k samples per prompt with the
configured sampling; each ``aug:*`` view gets ONE greedy answer on the image augmented with a seed
derived from (seed, prompt_id, view), as SeVa does. Speaks JSON lines on stdout (backend.progress).
Each engine call's candidates become a shard as soon as the call returns (``backend.jobs.shards``): a
run started again on the same inputs and config (``round resume`` after a kill) skips the calls whose
shard is on disk and generates only the rest, with the same batches and seeds, hence the same answers.
At the end the shards, in call order, are written atomically to ``RUN_DIR/candidates.parquet``. Never
opens the database.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from annotators.seva import PixelSpace, View, apply_view, parse_view
from backend import progress as job
from backend.engines import EngineSpec, GenRequest, SamplingSpec, derive_seed, make_engine
from backend.jobs.common import read_input, run_main
from backend.jobs.configs import GenerateJobConfig, load_job_config
from backend.jobs.shards import UNBATCHED_CALL, ShardStore, run_key
from backend.noise_space import policy_pixel_space
from core.errors import UsageError

log = logging.getLogger(__name__)

PROMPTS = "prompts.parquet"
OUTPUT = "candidates.parquet"
PROMPT_COLUMNS = ("prompt_id", "image_path", "question")

SCHEMA = pa.schema([
    ("candidate_id", pa.string()), ("prompt_id", pa.string()), ("round_id", pa.int64()),
    ("checkpoint_id", pa.string()), ("text", pa.string()), ("origin", pa.string()), ("view", pa.string()),
    ("augmentation", pa.string()), ("sampling", pa.string()), ("model", pa.string()), ("engine", pa.string()),
    ("seed", pa.int64()), ("sample_index", pa.int32()), ("num_tokens", pa.int32()),
    ("finish_reason", pa.string()),
])


def candidate_id(round_id: int, checkpoint_id: str, prompt_id: str, view: str, sample_index: int) -> str:
    key = f"{round_id}|{checkpoint_id}|{prompt_id}|{view}|{sample_index}"
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]


def load_prompts(run_dir: Path) -> list[dict]:
    return read_input(run_dir / PROMPTS, PROMPT_COLUMNS)


def check_images(rows: list[dict]) -> None:
    """Fail before loading the model when an image is missing."""
    missing = [r for r in rows if not Path(r["image_path"]).is_file()]
    if missing:
        first = missing[0]
        raise UsageError(f"{len(missing)} prompt image(s) not found, e.g. prompt {first['prompt_id']}: "
                         f"{first['image_path']} (image_path must be an absolute path to a readable file)")


def load_image(row: dict):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(row["image_path"]) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise UsageError(f"prompt {row['prompt_id']}: cannot read image {row['image_path']}: {err}") from None


def view_requests(rows: list[dict], view: View, base_seed: int, space: PixelSpace | None = None):
    """The engine requests of one view, and each one's augmentation record (``space``: the policy's
    PixelSpace, for the views that add noise in it)."""
    requests, records = [], []
    for row in rows:
        image = load_image(row)
        seed = derive_seed(base_seed, row["prompt_id"], view.spec)
        shown, record = apply_view(view, image, seed, space)
        requests.append(GenRequest(question=row["question"], image=shown, seed=seed, request_id=row["prompt_id"]))
        records.append(record)
    return requests, records


def engine_calls(rows: list[dict], views: list[View], size: int | None) -> list[list[tuple[View, list[dict]]]]:
    """The engine calls of the step, each a list of (view, prompt rows) groups: ``size`` rows of one view
    per call (the hf engine's batch), or when ``size`` is None (vllm, which schedules its own batches) every
    view of ``UNBATCHED_CALL`` rows per call. Each call is one shard of a resumable run."""
    if size is None:
        return [[(view, rows[start:start + UNBATCHED_CALL]) for view in views]
                for start in range(0, len(rows), UNBATCHED_CALL)]
    return [[(view, rows[start:start + size])] for view in views for start in range(0, len(rows), size)]


def to_parquet_bytes(rows: list[dict]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), sink)
    return sink.getvalue()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        raise UsageError("usage: python -m backend.jobs.generate RUN_DIR")
    # ---- setup
    run_dir = Path(argv[0])
    cfg = load_job_config(run_dir, GenerateJobConfig)
    gen, pol = cfg.generation, cfg.policy
    model_name = pol.model or cfg.model_path
    views = [parse_view(v) for v in gen.views]
    rows = load_prompts(run_dir)
    check_images(rows)
    # SeVa's diffusion noise goes on the policy processor's normalised tensor (backend.noise_space)
    space = (policy_pixel_space(cfg.model_path, pol.image_processor)
             if any(v.in_pixel_space for v in views) else None)
    policy = SamplingSpec.of(gen)
    greedy = policy.as_greedy()
    if gen.temperature == 0 and gen.k > 1:
        job.log(f"temperature 0 is greedy: one candidate per prompt instead of k={gen.k}")
    t0 = time.perf_counter()
    engine = make_engine(pol.engine, EngineSpec(
        model_path=cfg.model_path, dtype=pol.dtype, device=cfg.device, batch_size=gen.batch_size,
        tensor_parallel_size=pol.tensor_parallel_size, data_parallel_size=pol.data_parallel_size,
        adapter_path=cfg.adapter_path,
        image_processor=pol.image_processor))
    job.log(f"loaded {model_name} ({pol.engine} engine) in {time.perf_counter() - t0:.1f} s")

    # ---- run: the calls without a shard on disk (a resumed run), each saved as a shard when it returns
    calls = engine_calls(rows, views, engine.requests_per_call)
    store = ShardStore.open(run_dir, run_key(run_dir, PROMPTS), SCHEMA)
    shards, ignored = store.load([{(r["prompt_id"], view.spec) for view, batch in call for r in batch}
                                  for call in calls], ("prompt_id", "view"))
    total = len(rows) * len(views)  # counted per prompt and view, as the progress
    resumed = done = sum(len(batch) for i in shards for _, batch in calls[i])
    if shards or ignored:
        job.log(f"resuming: {resumed} of {total} prompts already done ({len(shards)} shard(s) kept"
                + (f", {ignored} unreadable or foreign shard(s) ignored: their prompts run again)" if ignored else ")"))
    tokens, gen_seconds = 0, 0.0
    job.progress(done, total, unit="prompts")
    for index, call in enumerate(calls):
        if index in shards:
            continue
        built = [(view, batch, *view_requests(batch, view, gen.seed, space)) for view, batch in call]
        t = time.perf_counter()
        results = engine.generate_many([(requests, policy if view.is_original else greedy)
                                        for view, _, requests, _ in built])
        seconds = time.perf_counter() - t
        n_tokens = sum(o.num_tokens for outputs in results for outs in outputs for o in outs)
        tokens, gen_seconds = tokens + n_tokens, gen_seconds + seconds
        call_rows: list[dict] = []
        for (view, batch, requests, records), outputs in zip(built, results):
            origin = "policy" if view.is_original else "seva_augmented"
            sampling = json.dumps((policy if view.is_original else greedy).record())
            for row, req, record, outs in zip(batch, requests, records, outputs):
                for i, o in enumerate(outs):
                    call_rows.append({
                        "candidate_id": candidate_id(cfg.round_id, cfg.checkpoint_id, row["prompt_id"], view.spec, i),
                        "prompt_id": row["prompt_id"], "round_id": cfg.round_id,
                        "checkpoint_id": cfg.checkpoint_id, "text": o.text, "origin": origin, "view": view.spec,
                        "augmentation": json.dumps(record) if record else None, "sampling": sampling,
                        "model": model_name, "engine": pol.engine, "seed": req.seed,
                        "sample_index": i, "num_tokens": o.num_tokens, "finish_reason": o.finish_reason,
                    })
            done += len(batch)
        store.write(index, call_rows)
        shards[index] = call_rows
        job.progress(done, total, unit="prompts")
        job.log(f"{', '.join(view.spec for view, _ in call)}: {sum(len(b) for _, b in call)} prompts, "
                f"{n_tokens} tokens in {seconds:.2f} s ({n_tokens / max(seconds, 1e-9):.0f} tokens/s)")

    # ---- save: the shards in call order, as one file
    out_rows = [row for index in range(len(calls)) for row in shards[index]]
    job.write_atomic(run_dir / OUTPUT, to_parquet_bytes(out_rows))
    summary = {"candidates": len(out_rows), "prompts": len(rows), "views": [v.spec for v in views],
               "resumed_prompts": resumed, "generated_prompts": total - resumed, "ignored_shards": ignored,
               "tokens": tokens, "seconds": round(gen_seconds, 3),
               "tokens_per_s": round(tokens / gen_seconds, 1) if gen_seconds else 0.0,
               "output": str(run_dir / OUTPUT)}
    job.log(f"wrote {len(out_rows)} candidates to {run_dir / OUTPUT}")

    # ---- cleanup
    engine.close()
    job.emit("done", summary=summary)
    return 0


if __name__ == "__main__":
    run_main(main, "generation")
