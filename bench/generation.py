"""Benchmark: batched k-sampling vs one sequence per generate() call, on the tiny VLM.

    python bench/generation.py [--prompts 16] [--k 5] [--max-new-tokens 32] [--batch-size 16]

Both modes go through the hf engine with the same prompts and seeds, and every sequence is forced to
exactly max_new_tokens (min_new_tokens = max_new_tokens), so both produce the same number of tokens:
  (a) batched: one generate() per batch of prompts with num_return_sequences=k
  (b) single:  one generate() per sequence (prompt x sample), batch 1, k=1
Prints sequences/s of each and the ratio (target: batched at least 5x faster).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUESTIONS = ["What is in the image?", "Describe the scene in detail.", "What color is it?", "How many are there?"]


def photos(n: int):
    from PIL import Image
    from skimage import data

    names = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "horse", "clock"]
    imgs = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in names]
    return [imgs[i % len(imgs)] for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    import torch

    from backend.engines import EngineSpec, GenRequest, HFEngine, SamplingSpec, derive_seed
    from backend.models import load_model, load_processor
    from backend.tiny import build_tiny

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny(Path(tmp) / "tiny")
        model, processor = load_model(path), load_processor(path)
    spec = EngineSpec(str(path), batch_size=args.batch_size)
    batched = HFEngine(spec, model=model, processor=processor)
    single = HFEngine(EngineSpec(str(path), batch_size=1), model=model, processor=processor)

    images = photos(args.prompts)
    requests = [GenRequest(question=QUESTIONS[i % len(QUESTIONS)], image=img, seed=derive_seed(0, i))
                for i, img in enumerate(images)]
    n_tok = args.max_new_tokens
    params = SamplingSpec(k=args.k, temperature=0.7, top_p=0.9, max_new_tokens=n_tok, min_new_tokens=n_tok)
    one = SamplingSpec(k=1, temperature=0.7, top_p=0.9, max_new_tokens=n_tok, min_new_tokens=n_tok)
    n_seq = args.prompts * args.k

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
    assert sum(len(o) for o in out_a) == len(out_b) == n_seq and tok_a == tok_b == n_seq * n_tok
    rate_a, rate_b = n_seq / secs_a, n_seq / secs_b
    print(f"tiny VLM, {args.prompts} prompts x k={args.k} = {n_seq} sequences of {n_tok} tokens, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"(a) batched   ({args.batch_size} prompts x k per generate): {secs_a:7.2f} s  {rate_a:8.1f} seq/s  "
          f"{tok_a / secs_a:8.0f} tokens/s  ({-(-args.prompts // args.batch_size)} calls)")
    print(f"(b) one sequence per generate:             {secs_b:7.2f} s  {rate_b:8.1f} seq/s  "
          f"{tok_b / secs_b:8.0f} tokens/s  ({n_seq} calls)")
    print(f"ratio (a)/(b): {rate_a / rate_b:.1f}x  (target >= 5x)")
    print(json.dumps({"batched_seq_per_s": round(rate_a, 2), "single_seq_per_s": round(rate_b, 2),
                      "ratio": round(rate_a / rate_b, 2), "sequences": n_seq, "tokens_per_sequence": n_tok}))


if __name__ == "__main__":
    main()
