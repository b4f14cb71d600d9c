"""The critic job: the critic VLM answers pre-rendered critic prompts, greedily, and the raw replies are saved.

    python -m backend.jobs.critic RUN_DIR

Reads ``RUN_DIR/config.json`` (``backend.jobs.configs.CriticJobConfig``: the workspace's
``judges.critic`` section plus the run's paths) and ``RUN_DIR/requests.parquet`` (request_id,
image_path, text; the prompts ``annotators.critic`` renders, written by the judge step). Runs the
critic through the same engine interface as the policy (``hf`` here, ``vllm`` on GPUs), greedy,
``critic.max_new_tokens`` from the config. Each batch's replies become a shard as soon as it is answered
(``backend.jobs.shards``): a run started again on the same requests and config skips the batches already
on disk. At the end the shards, in order, are written atomically to ``RUN_DIR/replies.parquet``
(request_id, text, num_tokens, latency_ms, finish_reason). Parsing and ingesting are the owner's job.
Never opens the database.
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from backend import progress as job
from backend.engines import EngineSpec, GenRequest, SamplingSpec, make_engine
from backend.jobs.common import read_input, run_main
from backend.jobs.configs import CriticJobConfig, load_job_config
from backend.jobs.shards import UNBATCHED_CALL, ShardStore, run_key
from core.errors import UsageError

log = logging.getLogger(__name__)

REQUESTS = "requests.parquet"
OUTPUT = "replies.parquet"
REQUEST_COLUMNS = ("request_id", "image_path", "text")
SCHEMA = pa.schema([("request_id", pa.string()), ("text", pa.string()), ("num_tokens", pa.int32()),
                    ("latency_ms", pa.float64()), ("finish_reason", pa.string())])


def load_requests(run_dir: Path) -> list[dict]:
    rows = read_input(run_dir / REQUESTS, REQUEST_COLUMNS)
    absent = sorted({r["image_path"] for r in rows if not Path(r["image_path"]).is_file()})
    if absent:
        raise UsageError(f"{len(absent)} image(s) not found, e.g. {absent[0]} "
                         "(image_path must be an absolute path to a readable file)")
    return rows


def read_replies(run_dir: Path) -> list[dict]:
    """The job's replies (owner side), or a UsageError when the job left none."""
    path = Path(run_dir) / OUTPUT
    if not path.is_file():
        raise UsageError(f"the critic job left no {path}; see {Path(run_dir) / 'job.log'}")
    return pq.read_table(path).to_pylist()


class _Images:
    """Open each image once per batch run (pairwise asks K(K-1) questions about one image)."""

    def __init__(self):
        self.path: str | None = None
        self.image = None

    def get(self, path: str):
        from PIL import Image

        if path != self.path:
            try:
                with Image.open(path) as im:
                    self.image = im.convert("RGB")
            except OSError as err:
                raise UsageError(f"cannot read image {path}: {err}") from None
            self.path = path
        return self.image


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        raise UsageError("usage: python -m backend.jobs.critic RUN_DIR")
    # ---- setup
    run_dir = Path(argv[0])
    cfg = load_job_config(run_dir, CriticJobConfig)
    critic = cfg.critic
    rows = load_requests(run_dir)
    params = SamplingSpec(k=1, temperature=0.0, max_new_tokens=critic.max_new_tokens)
    t0 = time.perf_counter()
    engine = make_engine(critic.engine, EngineSpec(model_path=cfg.model_path, dtype=cfg.dtype, device=cfg.device,
                                                   batch_size=cfg.batch_size,
                                                   tensor_parallel_size=cfg.tensor_parallel_size))
    job.log(f"loaded critic {critic.model or cfg.model_path} ({critic.engine} engine) in "
            f"{time.perf_counter() - t0:.1f} s; {len(rows)} {critic.mode} requests")

    # ---- run: the batches without a shard on disk (a resumed run), each saved as a shard when answered
    images = _Images()
    size = engine.requests_per_call or UNBATCHED_CALL  # vllm schedules its own batches within a call
    batches = [rows[start:start + size] for start in range(0, len(rows), size)]
    store = ShardStore.open(run_dir, run_key(run_dir, REQUESTS), SCHEMA)
    shards, ignored = store.load([{(r["request_id"],) for r in batch} for batch in batches], ("request_id",))
    resumed = done = sum(len(batches[i]) for i in shards)
    if shards or ignored:
        job.log(f"resuming: {resumed} of {len(rows)} requests already done ({len(shards)} shard(s) kept"
                + (f", {ignored} unreadable or foreign shard(s) ignored: they run again)" if ignored else ")"))
    tokens, seconds = 0, 0.0
    job.progress(done, len(rows), unit="requests")
    for index, batch in enumerate(batches):
        if index in shards:
            continue
        requests = [GenRequest(question=r["text"], image=images.get(r["image_path"]), request_id=r["request_id"])
                    for r in batch]
        t = time.perf_counter()
        outputs = engine.generate(requests, params)
        took = time.perf_counter() - t
        n_tokens = sum(o[0].num_tokens for o in outputs)
        tokens, seconds = tokens + n_tokens, seconds + took
        shards[index] = [{"request_id": r["request_id"], "text": outs[0].text, "num_tokens": outs[0].num_tokens,
                          "latency_ms": took * 1000.0 / len(batch), "finish_reason": outs[0].finish_reason}
                         for r, outs in zip(batch, outputs)]
        store.write(index, shards[index])
        done += len(batch)
        job.progress(done, len(rows), unit="requests")

    # ---- save: the shards in order, as one file
    out = [row for index in range(len(batches)) for row in shards[index]]
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(out, schema=SCHEMA), sink)
    job.write_atomic(run_dir / OUTPUT, sink.getvalue())
    summary = {"requests": len(out), "resumed_requests": resumed, "generated_requests": len(rows) - resumed,
               "ignored_shards": ignored, "tokens": tokens, "seconds": round(seconds, 3),
               "tokens_per_s": round(tokens / seconds, 1) if seconds else 0.0, "output": str(run_dir / OUTPUT)}
    job.log(f"wrote {len(out)} critic replies to {run_dir / OUTPUT}")

    # ---- cleanup
    engine.close()
    job.emit("done", summary=summary)
    return 0


if __name__ == "__main__":
    run_main(main, "critic job")
