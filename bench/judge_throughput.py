"""Gemini judge throughput: sequential vs concurrent calls, against the fake Gemini server.

The real google-genai SDK talks to ``tests/fakes/gemini_server.py`` on 127.0.0.1, which answers every
call after a fixed latency (300 ms by default, about what a short Gemini Flash rating takes). The
server runs in a child process, as a remote API would (``--in-process`` shares this process's GIL
with it, which caps the concurrent rate at what one core can do for client and server together). Phases:

  sequential   100 prompts, concurrency 1
  concurrent   1,000 prompts, concurrency 32, a 10,000 rpm limit that does not bind
  cached       the same 1,000 prompts again: every one a cache hit, no request sent
  binding      a limit that binds, on a scaled window (20 requests per 1 s), checked on the
               server's arrival clock

Every verdict is checked (status ok, scores equal to what the fake gave for that candidate's text),
so a fast but wrong run cannot pass.

    python bench/judge_throughput.py [--latency 0.3] [--seq 100] [--n 1000] [--concurrency 32]
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import argparse
import logging
import tempfile
import time

from PIL import Image

from annotators.base import METRICS, CandidateText, JudgeItem
from annotators.gemini import GeminiJudge
from annotators.ratelimit import SlidingWindowLimiter, max_in_window
from core.config import GeminiConfig
from tests.fakes.gemini_server import FakeGemini, FakeGeminiProcess, default_scores

KEY = "bench-fake-key"


def make_items(image: Path, n: int, k: int, tag: str) -> list[JudgeItem]:
    return [JudgeItem(prompt_id=f"{tag}{i}", question=f"What is happening in this picture? ({tag}{i})",
                      image_path=str(image), image_id=f"img-{tag}{i}",
                      candidates=tuple(CandidateText(f"{tag}{i}-{j}", f"Candidate answer {j} for prompt {i}: "
                                                     "a person stands next to a red car on a sunny street.")
                                       for j in range(k)))
            for i in range(n)]


def check(items: list[JudgeItem], verdicts) -> None:
    assert len(verdicts) == len(items)
    for item, v in zip(items, verdicts):
        assert v.status == "ok", (v.prompt_id, v.status, v.error)
        for cand, s in zip(item.candidates, v.scores):
            assert s.candidate_id == cand.candidate_id
            assert {m: getattr(s, m) for m in METRICS} == default_scores(cand.text), v.prompt_id


def run(fake: FakeGemini | FakeGeminiProcess, items, cache: Path, concurrency: int, rpm: int, limiter=None):
    cfg = GeminiConfig(base_url=fake.url, concurrency=concurrency, requests_per_minute=rpm,
                       tokens_per_minute=10**9, timeout_s=30, backoff_s=0.2)
    judge = GeminiJudge(cfg, cache, api_key=KEY, limiter=limiter)
    fake.reset()
    t0 = time.perf_counter()
    verdicts = judge.judge(items)
    elapsed = time.perf_counter() - t0
    check(items, verdicts)
    return elapsed, judge.stats, fake.arrivals()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latency", type=float, default=0.3, help="fake server latency per call, seconds")
    ap.add_argument("--seq", type=int, default=100, help="prompts in the sequential phase")
    ap.add_argument("--n", type=int, default=1000, help="prompts in the concurrent phase")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--k", type=int, default=5, help="candidates per prompt")
    ap.add_argument("--in-process", action="store_true", help="run the fake server in this process")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    server = FakeGemini if args.in_process else FakeGeminiProcess
    with tempfile.TemporaryDirectory(prefix="prefloop-bench-") as tmp, \
            server(api_key=KEY, latency_s=args.latency) as fake:
        print(f"fake Gemini at {fake.url} ({'in this process' if args.in_process else 'child process'}), "
              f"{args.latency * 1000:.0f} ms per call, k={args.k}")
        tmp = Path(tmp)
        image = tmp / "photo.jpg"
        Image.radial_gradient("L").convert("RGB").resize((512, 384)).save(image, quality=90)

        seq_items = make_items(image, args.seq, args.k, "s")
        t_seq, s_seq, _ = run(fake, seq_items, tmp / "seq.jsonl", 1, 10_000)
        r_seq = args.seq / t_seq
        print(f"sequential   {args.seq:5d} prompts, concurrency  1: {t_seq:7.2f} s  {r_seq:7.2f} prompts/s  "
              f"({s_seq.calls} calls)")

        con_items = make_items(image, args.n, args.k, "c")
        rpm = 10_000
        t_con, s_con, arrivals = run(fake, con_items, tmp / "con.jsonl", args.concurrency, rpm)
        r_con = args.n / t_con
        peak = max_in_window(arrivals, 60.0)
        print(f"concurrent   {args.n:5d} prompts, concurrency {args.concurrency:2d}: {t_con:7.2f} s  {r_con:7.2f} prompts/s  "
              f"({s_con.calls} calls, {s_con.tokens_in} tokens in, {s_con.tokens_out} out)")
        print(f"speed-up     {r_con / r_seq:.1f}x  (target >= 20x; ideal {min(args.concurrency, args.n):d}x)")
        print(f"rpm limit    {rpm} per 60 s: max requests in any 60 s window {peak}  "
              f"-> {'held' if peak <= rpm else 'EXCEEDED'}")

        t_hit, s_hit, arr_hit = run(fake, con_items, tmp / "con.jsonl", args.concurrency, rpm)
        print(f"cached       {args.n:5d} prompts again: {t_hit:7.2f} s  {len(arr_hit)} requests sent, "
              f"{s_hit.cache_hits} cache hits")

        window, limit, n_bind = 1.0, 20, 60
        limiter = SlidingWindowLimiter(limit, 10**9, window_s=window)
        t_bind, s_bind, arr_bind = run(fake, make_items(image, n_bind, args.k, "b"), tmp / "bind.jsonl",
                                       args.concurrency, rpm, limiter=limiter)
        peak_b = max_in_window(arr_bind, window)
        print(f"binding      {n_bind} prompts at {limit} per {window:g} s window: {t_bind:5.2f} s, "
              f"max arrivals in any {window:g} s window {peak_b} -> {'held' if peak_b <= limit else 'EXCEEDED'}, "
              f"waited {s_bind.rate_wait_s:.2f} s for the limit")


if __name__ == "__main__":
    main()
