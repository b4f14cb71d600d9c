"""Benchmark: one DPO epoch with and without the reference log-prob cache, on the `demo` model.

    python bench/ref_cache.py [--model demo] [--pairs 16] [--batch-size 2] [--repeats 2]

Same pairs (skimage photos, fluent chosen/rejected answers), same seed, LoRA + trainable projector
(the default train config), in process through backend.dpo:
  uncached: TRL's own loop, a reference forward on every step
  cold:     the cache is empty: it computes every pair once (and appends it)
  cached:   every pair is cached: no reference forward at all
The ceiling is what saving exactly one no-grad reference forward per step can give:
  ceiling = t_uncached / (t_uncached - t_ref_forward), with t_ref_forward the time of TRL's
  compute_ref_log_probs over the same batches (adapter disabled, no grad).
uncached and cached runs alternate `--repeats` times and the fastest of each counts. Times are given
as wall seconds and as CPU seconds of this process (which a machine shared with other work disturbs
far less than wall time).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import common

from backend import dpo, ref_cache
from core.config import TrainConfig

QUESTIONS = ["What is in the image?", "Describe the picture in one sentence.", "What do you see here?"]


def make_pairs(root: Path, n: int) -> list[dict]:
    photos = common.photo_files(root / "photos")
    names = list(photos)
    pairs = []
    for i in range(n):
        name = names[i % len(names)]
        pairs.append({"prompt_id": f"p{i}", "chosen_id": f"p{i}-c", "rejected_id": f"p{i}-r",
                      "image_path": str(photos[name]), "question": QUESTIONS[(i // len(names)) % len(QUESTIONS)],
                      "chosen_text": common.PHOTOS[name], "rejected_text": common.WRONG[i % len(common.WRONG)]})
    return pairs


def run(name: str, root: Path, model_dir: Path, processor, pairs: list[dict], cfg: TrainConfig, cache=None,
        max_steps: int = -1) -> dict:
    from backend.models import load_model

    key = None
    if cache is not None:
        context = ref_cache.make_context(model_dir, processor, dtype="float32", max_length=cfg.max_length,
                                         max_completion_length=cfg.max_completion_length)
        key = context.row_key
    dataset, stats = dpo.build_dataset(pairs, processor, cfg, ref_key=key)
    args = dpo.dpo_config(cfg, output_dir=root / name, device="cpu", dtype="float32", max_steps=max_steps)
    model = load_model(model_dir)
    metrics = root / f"{name}.jsonl"
    trainer = dpo.build_trainer(model, None, processor, dataset, args, dpo.lora_config(cfg, model), metrics,
                                ref_cache=cache)
    metrics.unlink(missing_ok=True)
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    print(f"  {name}: {wall:.1f} s wall, {cpu:.1f} s CPU, {trainer.state.global_step} steps", flush=True)
    return {"trainer": trainer, "wall": wall, "cpu": cpu, "steps": trainer.state.global_step, "losses": losses,
            "pairs": stats.used, "longest": stats.longest}


def ref_forward_seconds(trainer) -> tuple[float, float]:
    """(wall, CPU) seconds of TRL's reference forward (adapter disabled, no grad) over the epoch's batches,
    collation excluded."""
    import torch

    wall = cpu = 0.0
    for batch in trainer.get_train_dataloader():
        batch = trainer._prepare_inputs(batch)
        batch.pop(dpo.REF_KEYS, None)
        w, c = time.perf_counter(), time.process_time()
        with torch.no_grad():
            trainer.compute_ref_log_probs(trainer.model, batch)
        wall, cpu = wall + time.perf_counter() - w, cpu + time.process_time() - c
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo", choices=["demo", "tiny"])
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    opts = ap.parse_args()

    import torch

    from backend.models import load_processor

    with tempfile.TemporaryDirectory(prefix="bench-refcache-") as tmp:
        root = Path(tmp)
        model_dir = common.base_model(opts.model, root / "model")
        processor = load_processor(model_dir)
        pairs = make_pairs(root, opts.pairs)
        cfg = TrainConfig(batch_size=opts.batch_size, learning_rate=1e-5, max_completion_length=64)
        print(f"model {opts.model}, {opts.pairs} pairs, batch {opts.batch_size}, LoRA r={cfg.lora_r} + projector, "
              f"torch threads {torch.get_num_threads()}", flush=True)
        run("warmup", root, model_dir, processor, pairs, cfg, max_steps=2)  # one-off lazy initialisation
        cold = run("cold", root, model_dir, processor, pairs, cfg, cache=ref_cache.RefLogpCache(root / "cache"))
        plain, warm, refs = [], [], []
        for _ in range(opts.repeats):
            plain.append(run("uncached", root, model_dir, processor, pairs, cfg))
            cache = ref_cache.RefLogpCache(root / "cache")
            warm.append(run("cached", root, model_dir, processor, pairs, cfg, cache=cache))
            assert cache.stats.ref_forwards == 0 and cache.stats.served == plain[-1]["pairs"]
            refs.append(ref_forward_seconds(warm[-1]["trainer"]))
        drift = max(abs(a - b) for p, w in zip(plain, warm) for a, b in zip(p["losses"], w["losses"], strict=True))

        steps = cold["steps"]
        best = {"uncached": {k: min(r[k] for r in plain) for k in ("wall", "cpu")},
                "cached": {k: min(r[k] for r in warm) for k in ("wall", "cpu")},
                "cold cache": {k: cold[k] for k in ("wall", "cpu")},
                "ref forward only": {"wall": min(r[0] for r in refs), "cpu": min(r[1] for r in refs)}}
        rows = [[name, steps, t["wall"], t["cpu"], t["cpu"] / steps] for name, t in best.items()]
        print(common.table(["run (fastest)", "steps", "wall s", "CPU s", "CPU s/step"], rows))
        print(f"\n{cold['pairs']} pairs, longest sequence {cold['longest']} tokens")
        for clock in ("cpu", "wall"):
            t_plain, t_warm, t_ref = best["uncached"][clock], best["cached"][clock], best["ref forward only"][clock]
            print(f"{clock:>4}: cached vs uncached {t_plain / t_warm:.2f}x, ceiling {t_plain / (t_plain - t_ref):.2f}x "
                  f"(reference forward {t_ref / steps:.2f} s of a {t_plain / steps:.2f} s step)")
        print(f"cold cache (fills it) vs uncached: {cold['cpu'] / best['uncached']['cpu']:.2f}x the CPU time")
        print(f"largest per-step loss difference cached vs uncached: {drift:.2e}")


if __name__ == "__main__":
    main()
