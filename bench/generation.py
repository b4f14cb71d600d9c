"""Benchmark: batched k-sampling vs one sequence per generate() call, per model family (tiny builds).

    python bench/generation.py [--families tiny,tiny-qwen2-vl] [--prompts 16] [--k 5] [--max-new-tokens 32]
                               [--batch-size 16] [--threads N]

Families: ``tiny`` (plain LLaVA) and each tiny random-weight build of a real family
(``backend.tiny_families``: tiny-llava-onevision, tiny-qwen2-vl, tiny-idefics3), built through
``backend.models.materialize``. For each, both modes go through the hf engine with the same prompts
(skimage photos) and seeds, and every sequence is forced to exactly max_new_tokens (min_new_tokens =
max_new_tokens), so both produce the same number of tokens:
  (a) batched: one generate() per batch of prompts with num_return_sequences=k
  (b) single:  one generate() per sequence (prompt x sample), batch 1, k=1
Prints each family's image tokens per photo (the processor's expansion of the image placeholder: they
dominate the prompt, hence the cost of a forward), then one row per family with tokens/s of each mode
and their ratio (target: batched at least 5x faster).

Torch threads: as many as the generate job gets (``backend.job_runner.torch_threads()``: the cores this
process may use less one, at least 1), set as OMP_NUM_THREADS before torch loads; ``--threads`` overrides.
On the shared 2-core machine, 2 threads made both modes 5-10x slower than 1 as soon as anything else ran
(each of the many tiny parallel regions waits for a descheduled thread), and the ratio swung 0.8x-28x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import common

from backend.job_runner import torch_threads
from backend.models import TINY_FAMILIES

FAMILY_NAMES = ("tiny", *TINY_FAMILIES)
QUESTIONS = ["What is in the image?", "Describe the scene in detail.", "What color is it?",
             "How many are there?"]


def family_names(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAMILY_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown family {', '.join(unknown) or '(none)'}; "
                                         f"choose from: {', '.join(FAMILY_NAMES)}")
    return names


def photos(root: Path, n: int) -> list[tuple[str, object]]:
    """n (photo name, PIL image) pairs, cycling through bench/common.py's photos."""
    from PIL import Image

    files = common.photo_files(root)
    loaded = [(name, Image.open(path).convert("RGB")) for name, path in files.items()]
    return [loaded[i % len(loaded)] for i in range(n)]


def prompt_tokens(processor, image_token: str, requests) -> list[tuple[int, int]]:
    """(image tokens, prompt tokens) of each request as the processor expands it (one prompt at a time)."""
    from backend.engines import build_messages

    image_id = processor.tokenizer.convert_tokens_to_ids(image_token)
    out = []
    for r in requests:
        text = processor.apply_chat_template(build_messages(r), add_generation_prompt=True)
        ids = processor(images=[r.image], text=[text], return_tensors="pt")["input_ids"][0]
        out.append((int((ids == image_id).sum()), len(ids)))
    return out


def measure(name: str, folder: Path, shots: list, args) -> dict:
    """Image tokens per prompt and tokens/s of (a) batched and (b) one sequence per call, for one family."""
    from backend.engines import EngineSpec, GenRequest, HFEngine, SamplingSpec, derive_seed
    from backend.families import family_of
    from backend.models import load_model, load_processor

    model, processor = load_model(folder), load_processor(folder)
    batched = HFEngine(EngineSpec(str(folder), batch_size=args.batch_size), model=model, processor=processor)
    single = HFEngine(EngineSpec(str(folder), batch_size=1), model=model, processor=processor)
    requests = [GenRequest(question=QUESTIONS[i % len(QUESTIONS)], image=img, seed=derive_seed(0, i))
                for i, (_, img) in enumerate(shots)]
    lengths = prompt_tokens(processor, family_of(folder).image_token, requests)
    n_tok = args.max_new_tokens
    params = SamplingSpec(k=args.k, temperature=0.7, top_p=0.9, max_new_tokens=n_tok, min_new_tokens=n_tok)
    one = SamplingSpec(k=1, temperature=0.7, top_p=0.9, max_new_tokens=n_tok, min_new_tokens=n_tok)
    n_seq = len(requests) * args.k

    batched.generate(requests[:2], params)  # warm-up
    single.generate(requests[:1], one)

    t = time.perf_counter()
    out_a = batched.generate(requests, params)
    secs_a = time.perf_counter() - t

    t = time.perf_counter()
    out_b = []
    for r in requests:
        for s in range(args.k):
            seeded = GenRequest(question=r.question, image=r.image, seed=derive_seed(r.seed, s))
            out_b.extend(single.generate([seeded], one))
    secs_b = time.perf_counter() - t

    tok_a = sum(o.num_tokens for outs in out_a for o in outs)
    tok_b = sum(o.num_tokens for outs in out_b for o in outs)
    assert sum(len(o) for o in out_a) == len(out_b) == n_seq, (len(out_a), len(out_b))
    assert tok_a == tok_b == n_seq * n_tok, (tok_a, tok_b)
    calls_a = -(-len(requests) // args.batch_size)
    print(f"{name}: (a) batched {secs_a:7.2f} s in {calls_a} generate calls, (b) single {secs_b:7.2f} s in "
          f"{n_seq} calls; load average {os.getloadavg()[0]:.1f}", flush=True)
    return {"image_tokens": {shot: img for (shot, _), (img, _) in zip(shots, lengths)},
            "prompt_tokens": {"min": min(n for _, n in lengths), "max": max(n for _, n in lengths)},
            "sequences": n_seq, "tokens": tok_a,
            "batched_s": round(secs_a, 2), "single_s": round(secs_b, 2),
            "batched_tok_per_s": round(tok_a / secs_a, 1), "single_tok_per_s": round(tok_b / secs_b, 1),
            "ratio": round(secs_b / secs_a, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", type=family_names, default=list(FAMILY_NAMES),
                    help=f"comma list (default all: {','.join(FAMILY_NAMES)})")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch_threads(),
                    help="torch CPU threads (default: the generate job's, the cores less one: %(default)s)")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch loads

    import torch

    from backend.models import materialize

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    print(f"{args.prompts} prompts x k={args.k} = {args.prompts * args.k} sequences of {args.max_new_tokens} "
          f"tokens per family, batch {args.batch_size}; torch {torch.__version__}, torch threads "
          f"{torch.get_num_threads()} of {os.cpu_count()} cores, load average {load_start:.1f} at start",
          flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        shots = photos(Path(tmp) / "photos", args.prompts)
        for name in args.families:
            t = time.perf_counter()
            folder = materialize(name, Path(tmp) / name)
            print(f"{name}: built in {time.perf_counter() - t:.1f} s", flush=True)
            results[name] = measure(name, folder, shots, args)

    names = list(dict.fromkeys(shot for shot, _ in shots))
    print("\nimage tokens per prompt (the processor's expansion for each photo; WxH of the photo):")
    sizes = {shot: f"{img.width}x{img.height}" for shot, img in shots}
    print(common.table(["family", *(f"{n} {sizes[n]}" for n in names), "prompt tokens (min-max)"],
                       [[name, *(r["image_tokens"][n] for n in names),
                         f"{r['prompt_tokens']['min']}-{r['prompt_tokens']['max']}"]
                        for name, r in results.items()]))
    print(f"\ntokens/s: (a) batched, up to {args.batch_size} prompts x k per generate; "
          "(b) one sequence per generate")
    print(common.table(["family", "mean image tokens", "sequences", "tokens", "batched tok/s", "single tok/s",
                        "batched/single"],
                       [[name, f"{statistics.mean(r['image_tokens'][s] for s, _ in shots):.1f}",
                         r["sequences"], r["tokens"], f"{r['batched_tok_per_s']:.0f}",
                         f"{r['single_tok_per_s']:.0f}", f"{r['ratio']:.1f}x"]
                        for name, r in results.items()]))
    print("ratio batched/single tok/s: " + ", ".join(f"{n} {r['ratio']:.1f}x" for n, r in results.items())
          + "  (target >= 5x)")
    print(f"load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end (1-minute, as `uptime`)")
    print(json.dumps({"prompts": args.prompts, "k": args.k, "tokens_per_sequence": args.max_new_tokens,
                      "batch_size": args.batch_size, "threads": args.threads, "families": results}))


if __name__ == "__main__":
    main()
