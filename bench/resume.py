"""Benchmark: a generate job killed (kill -9) at 50% and run again, vs a full rerun.

    python bench/resume.py [--model tiny] [--prompts 128] [--k 5] [--max-new-tokens 64] [--batch-size 4]
                           [--kill-at 0.5]

One run folder of the generate job (``backend.jobs.generate``: skimage photos, k samples per prompt of the
``original`` view only, so that every engine call costs the same and 50% of the calls is 50% of the work;
the hf engine) is run three ways, each as the job subprocess the owner starts:
  (a) uninterrupted, start to end: the reference candidates and the cost of a full (re)run;
  (b) the same job in a second folder, SIGKILLed once ``--kill-at`` of its engine calls have a shard on disk;
  (c) the same job started again in (b)'s folder, as ``round resume`` does.
Prints the prompts generated twice (the prompts the killed attempt had saved plus those the
resumed run generated, less the total: target 0), whether (c)'s candidates equal (a)'s (ids, seeds,
texts), and the wall times of (a) and (c) with the time the resume saved vs a full rerun (before shards,
a killed job's outputs were lost and the whole job ran again). The engine call in flight at the kill
(at most ``--batch-size`` prompts) is the only work lost; it is not counted as generated.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import common

from backend.job_runner import Job, python_module, torch_threads, write_config
from backend.jobs import shards

VIEWS = ["original"]
QUESTIONS = ["What is in the image?", "Describe the scene in detail.", "What color is it?",
             "How many are there?"]


def write_run(run_dir: Path, model_dir: Path, photos: list[Path], args) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from backend.jobs.configs import GenerateJobConfig
    from core.config import GenerationConfig, PolicyConfig

    run_dir.mkdir(parents=True)
    rows = [{"prompt_id": f"p{i:04d}", "image_path": str(photos[i % len(photos)]),
             "question": QUESTIONS[i % len(QUESTIONS)]} for i in range(args.prompts)]
    pq.write_table(pa.Table.from_pylist(rows), run_dir / "prompts.parquet")
    gen = GenerationConfig(k=args.k, temperature=0.8, top_p=0.95, max_new_tokens=args.max_new_tokens, seed=3,
                           batch_size=args.batch_size, views=VIEWS)
    config = GenerateJobConfig(model_path=str(model_dir), device="cpu", round_id=1, checkpoint_id="c0",
                               policy=PolicyConfig(model=args.model, dtype="float32"), generation=gen)
    write_config(run_dir, config.model_dump())
    return run_dir


def shards_on_disk(run_dir: Path) -> int:
    return len(list((run_dir / "shards").glob("*/*.parquet")))


def run(run_dir: Path, kill_at_shards: int | None = None) -> tuple[dict, float, bool]:
    """Run the job in ``run_dir`` (SIGKILL its process group once ``kill_at_shards`` shards are on disk):
    its summary ({} when killed), wall seconds, and whether it was killed."""
    job = Job(python_module("backend.jobs.generate", str(run_dir)), run_dir)
    killed = threading.Event()

    def killer() -> None:
        while job.proc.poll() is None:
            if shards_on_disk(run_dir) >= kill_at_shards:
                os.killpg(job.pid, signal.SIGKILL)
                killed.set()
                return
            time.sleep(0.02)

    if kill_at_shards is not None:
        threading.Thread(target=killer, daemon=True).start()
    t0 = time.perf_counter()
    try:
        summary = job.wait().summary
    except Exception:  # JobFailed after the kill; anything else is re-raised
        if not killed.is_set():
            raise
        summary = {}
    return summary, time.perf_counter() - t0, killed.is_set()


def candidates(run_dir: Path) -> list[tuple]:
    import pyarrow.parquet as pq

    rows = pq.read_table(run_dir / "candidates.parquet").to_pylist()
    return sorted((r["candidate_id"], r["seed"], r["text"]) for r in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="a built-in model: tiny (default) or demo")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--kill-at", type=float, default=0.5, help="fraction of the engine calls done at the kill")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(torch_threads()))

    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp:
        root = Path(tmp)
        model_dir = common.base_model(args.model, root / "model")
        photos = list(common.photo_files(root / "photos").values())
        calls = -(-args.prompts // args.batch_size) * len(VIEWS)  # one shard per engine call
        total = args.prompts * len(VIEWS)
        full_dir = write_run(root / "full", model_dir, photos, args)
        full, full_s, _ = run(full_dir)
        killed_dir = write_run(root / "killed", model_dir, photos, args)
        kill_at = max(1, round(calls * args.kill_at))
        _, killed_s, was_killed = run(killed_dir, kill_at_shards=kill_at)
        if not was_killed:
            raise SystemExit("the job finished before the kill landed: use more --prompts")
        kept_shards = shards_on_disk(killed_dir)
        kept = shards.resume(killed_dir, "prompts.parquet", ("prompt_id", "view"))  # as `round resume` does
        resumed, resumed_s, _ = run(killed_dir)
        twice = kept + resumed["generated_prompts"] - total
        identical = candidates(killed_dir) == candidates(full_dir)

    print(f"generate job: {args.model}, {args.prompts} prompts x views {VIEWS}, k={args.k}, "
          f"{args.max_new_tokens} new tokens, batch {args.batch_size}: {calls} engine calls, one shard each")
    print(common.table(["run", "wall s", "generating s", "prompts generated", "prompts from shards"], [
        ["(a) uninterrupted", round(full_s, 2), full["seconds"], full["generated_prompts"], full["resumed_prompts"]],
        [f"(b) killed at {kept_shards}/{calls} calls", round(killed_s, 2), "-", f"{kept} saved", 0],
        ["(c) resumed", round(resumed_s, 2), resumed["seconds"], resumed["generated_prompts"],
         resumed["resumed_prompts"]],
    ]))
    print(f"prompts generated twice after a kill at {kept_shards / calls:.0%}: {twice} (target 0); "
          f"resumed candidates identical to the uninterrupted run: {'yes' if identical else 'NO'}")
    saved = full_s - resumed_s
    print(f"time saved by the resume vs a full rerun: {saved:.2f} s of {full_s:.2f} s "
          f"(speed-up {full_s / resumed_s:.2f}x; both include starting the job and loading the model; "
          f"generating alone: {full['seconds']:.2f} s vs {resumed['seconds']:.2f} s)")
    print("RESULT " + json.dumps({
        "prompts": args.prompts, "views": len(VIEWS), "calls": calls, "killed_at_calls": kept_shards,
        "prompts_generated_twice": twice, "identical": identical, "full_s": round(full_s, 2),
        "resumed_s": round(resumed_s, 2), "saved_s": round(saved, 2),
        "full_generating_s": full["seconds"], "resumed_generating_s": resumed["seconds"], "speedup": round(full_s / resumed_s, 2)}))
    return 0 if identical and twice == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
