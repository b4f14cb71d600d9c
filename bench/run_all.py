"""Run the benchmarks in bench/ and write bench/RESULTS.md.

Each benchmark is a script that measures our code path and a baseline in the same run and prints
both and their ratio. This runner starts each one as a subprocess, keeps what it printed on stdout
verbatim (and its ``RESULT {...}`` JSON line, or a last line that is a JSON object, when it prints
one), and records the machine (CPUs, RAM, CPU model), the date, the command, the wall time and the
baseline the ratio is against. Results accumulate in ``bench/RESULTS.md`` itself (the raw entries sit
in an HTML comment at its end, one per benchmark, replaced when that benchmark runs again), and the
report is rewritten from all of them, so ``--only pairs_export`` updates one section and keeps the
others. A benchmark that has never run here
is listed as "not run in this report" with the command to run it.

    python bench/run_all.py                      # every benchmark, full size
    python bench/run_all.py --quick              # smaller sizes (said in the report)
    python bench/run_all.py --only import_rate --only export_rate
    python bench/run_all.py --skip label_latency --skip loop_learns
    python bench/run_all.py --list
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"
DATA_OPEN, DATA_CLOSE = "<!-- run_all results (kept for the next run; do not edit)", "-->"
RESULT_PREFIX = "RESULT "
LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[(DEBUG|INFO|WARNING)\]")  # library log records
HEADLINE = re.compile(r"\b(ratio|speed-up|vs uncached|blank at round \d+:|majority class|projector features, probe"
                      r"|generated twice)",
                      re.IGNORECASE)


@dataclass(frozen=True)
class Bench:
    """One benchmark script: how to run it and what its ratio is measured against."""

    script: str
    what: str
    baseline: str
    args: tuple[str, ...] = ()
    quick: tuple[str, ...] = ()
    """arguments of a smaller run (``--quick``); a script that has its own --quick flag gets it too"""
    timeout_s: float = 3600
    slow: bool = False
    """takes more than a few minutes at full size"""
    env: dict[str, str] = field(default_factory=dict)


BENCHES: dict[str, Bench] = {
    "generation": Bench(
        "generation.py", "batched k-sampling per model family: tiny + the tiny real-family builds (tokens/s)",
        "one sequence per generate() call, same prompts, seeds and token count",
        quick=("--prompts", "8")),
    "import_rate": Bench(
        "import_rate.py", "`prefloop import` rows/s (plan + bulk write)",
        "the same plan written with one INSERT per row (in one transaction)",
        quick=("--rows", "2000")),
    "export_rate": Bench(
        "export_rate.py", "read-only SQL export to Parquet and JSONL, 1M candidate rows",
        "fetchdf() + DataFrame.to_parquet; fetchall() + json.dumps per row",
        quick=("--rows", "200000")),
    "judge_throughput": Bench(
        "judge_throughput.py", "Gemini judge prompts/s against the fake server (300 ms a call)",
        "the same judge at concurrency 1 (sequential calls)",
        quick=("--seq", "20", "--n", "200")),
    "label_latency": Bench(
        "label_latency.py", "review studio submit -> next item latency at 100k prompts",
        "a no-op endpoint of the same app (same auth, no database work): ratio of the p95s",
        quick=("--prompts", "10000", "--submits", "50", "--annotators", "4", "--per-annotator", "10"),
        slow=True),
    "pairs_export": Bench(
        "pairs_export.py", "pair building + TRL Parquet export at 1M candidates (best-worst)",
        "pandas: one query into a DataFrame, best/worst picked per prompt in Python, DataFrame.to_parquet",
        quick=("--prompts", "20000"), slow=True),
    "ref_cache": Bench(
        "ref_cache.py", "one DPO epoch with the reference log-prob cache (demo model, LoRA + projector)",
        "TRL's own loop, a reference forward on every step (uncached), same pairs and seed",
        quick=("--model", "tiny", "--pairs", "8", "--repeats", "1"), slow=True),
    "vision_probe": Bench(
        "vision_probe.py", "diagnostic: shape colour read by a linear probe from the demo model's untrained vision features",
        "the majority class, and the same probe on raw 16x16 pixels",
        quick=("--images", "200")),
    "loop_learns": Bench(
        "loop_learns.py", "the loop learns: held-out easy-vqa accuracy over 3 rounds (demo model, reference judge)",
        "c(r-1) in each round, and a blind control workspace whose pictures are all gray",
        quick=("--model", "tiny", "--rounds", "1", "--train-questions", "20", "--test-questions", "20"),
        timeout_s=4 * 3600, slow=True),
    "resume": Bench(
        "resume.py", "a generate job killed (kill -9) at 50% and resumed: prompts generated twice (target 0), time saved",
        "a full rerun of the same job (before shards a killed job's outputs were lost)",
        quick=("--prompts", "16")),
}


# ---- the machine -----------------------------------------------------------------------------------

def machine() -> dict:
    cpu = platform.processor() or ""
    ram_gb = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = round(int(line.split()[1]) / 1024 ** 2, 1)
                break
    except OSError:
        pass
    versions = {}
    for mod in ("duckdb", "pyarrow", "pandas", "torch", "transformers"):
        with contextlib.suppress(Exception):  # a missing optional package is just not listed
            versions[mod] = __import__(mod).__version__
    return {"nproc": os.cpu_count(), "ram_gb": ram_gb, "cpu": cpu or "unknown", "os": platform.platform(),
            "python": platform.python_version(), "versions": versions, "commit": _commit()}


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=REPO, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_line(m: dict) -> str:
    return f"{m['nproc']} CPUs, {m['ram_gb']} GB RAM, {m['cpu']}"


# ---- running -----------------------------------------------------------------------------------------

def command(name: str, quick: bool) -> list[str]:
    b = BENCHES[name]
    argv = [sys.executable, str(BENCH_DIR / b.script), *b.args]
    if quick:
        argv += list(b.quick)
        if not b.quick and _has_flag(b.script, "--quick"):
            argv.append("--quick")
    return argv


def _has_flag(script: str, flag: str) -> bool:
    try:
        out = subprocess.run([sys.executable, str(BENCH_DIR / script), "--help"], check=False, cwd=REPO, capture_output=True,
                             text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return False
    return flag in out.stdout


def display(argv: list[str]) -> str:
    """The command as a person types it from the repo root."""
    return " ".join(["python", *(str(Path(a).relative_to(REPO)) if a.startswith(str(REPO)) else a for a in argv[1:])])


def parse_result(stdout: str) -> dict | None:
    """The ``RESULT {...}`` line, else the last stdout line that is a JSON object, else None."""
    lines = [ln.strip() for ln in stdout.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith(RESULT_PREFIX):
            try:
                return json.loads(ln[len(RESULT_PREFIX):])
            except ValueError:
                return None
    for ln in reversed(lines):
        if ln.startswith("{"):
            try:
                obj = json.loads(ln)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


def figures(stdout: str) -> list[str]:
    """What the benchmark printed, verbatim, without the machine-readable line and progress noise."""
    out = []
    for ln in stdout.splitlines():
        s = ln.rstrip()
        if (not s or s.startswith(RESULT_PREFIX) or "\r" in s or re.search(r"\d+%\|", s) or LOG_LINE.match(s)
                or s.lstrip().startswith('{"event": ')):  # a job's progress/metrics events
            continue
        out.append(s)
    return out


def run_one(name: str, quick: bool, m: dict) -> dict:
    b = BENCHES[name]
    argv = command(name, quick)
    print(f"== {name}: {display(argv)}", flush=True)
    load = round(os.getloadavg()[0], 1) if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **b.env}
    # Streamed, so a long benchmark shows its lines as they come (and in bench/out/<name>.log).
    log_path = BENCH_DIR / "out" / f"{name}.log"
    log_path.parent.mkdir(exist_ok=True)
    lines: list[str] = []
    with log_path.open("w") as log_file, tempfile.TemporaryFile("w+") as err_file:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=err_file, text=True, env=env)
        timer = threading.Timer(b.timeout_s, proc.kill)
        timer.start()
        try:
            for line in proc.stdout:
                lines.append(line)
                log_file.write(line)
                log_file.flush()
                if figures(line):
                    print(f"   | {line.rstrip()}", flush=True)
            proc.wait()
        finally:
            timer.cancel()
        timed_out = proc.returncode is not None and proc.returncode < 0 and time.perf_counter() - t0 >= b.timeout_s
        rc = None if timed_out else proc.returncode
        err_file.seek(0)
        stderr = f"timed out after {b.timeout_s:.0f} s" if timed_out else err_file.read()
    stdout = "".join(lines)
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = [ln for ln in stderr.splitlines() if ln.strip()][-5:]
        print(f"   FAILED (exit {rc}): " + " | ".join(tail), flush=True)
    return {
        "name": name, "command": display(argv), "quick": quick, "date": datetime.datetime.now().isoformat(" ", "seconds"),
        "machine": m, "load_avg_at_start": load, "wall_s": round(wall, 1), "returncode": rc, "figures": figures(stdout),
        "result": parse_result(stdout),
        "error": None if rc == 0 else " | ".join([ln for ln in stderr.splitlines() if ln.strip()][-5:]),
    }


# ---- the report ----------------------------------------------------------------------------------------

def load_results() -> dict:
    """The entries stored at the end of RESULTS.md by the last run (empty if none or unreadable)."""
    try:
        text = RESULTS_MD.read_text()
    except OSError:
        return {}
    start = text.rfind(DATA_OPEN)
    end = text.rfind(DATA_CLOSE)
    if start < 0 or end < start:
        return {}
    try:
        data = json.loads(text[start + len(DATA_OPEN):end])
    except ValueError:
        return {}
    return {k: v for k, v in data.items() if k in BENCHES} if isinstance(data, dict) else {}


def write_report(results: dict) -> str:
    lines = ["# Benchmark results", "",
             "Written by `python bench/run_all.py` (see its docstring for `--only`, `--skip`, `--quick`). Each",
             "benchmark measures our code path and a baseline **in the same run, on the same machine**, and the",
             "ratio is against that baseline; the figures below are what each script printed, verbatim.",
             "Machines differ between sections when they were run at different times: each says its own.", ""]
    lines += ["| benchmark | what | baseline (the ratio is against it) | headline (verbatim) | status | date | machine |",
              "|---|---|---|---|---|---|---|"]
    for name, b in BENCHES.items():
        r = results.get(name)
        present = (BENCH_DIR / b.script).is_file()
        if r is None:
            status = "not run in this report" if present else "no script in this tree"
            date = mach = head = "-"
        else:
            status = ("ok" if r["returncode"] == 0 else f"failed (exit {r['returncode']})") + (
                " (quick sizes)" if r["quick"] else "")
            date, mach = r["date"], machine_line(r["machine"])
            if r.get("load_avg_at_start") is not None:
                mach += f", load average {r['load_avg_at_start']} at start"
            head = "<br>".join(" ".join(ln.split()) for ln in r["figures"]
                             if HEADLINE.search(ln) and not ln.lstrip().startswith("{")) or "-"
        lines.append(f"| `{name}` | {b.what} | {b.baseline} | {head.replace('|', '/')} | {status} | {date} | {mach} |")
    lines.append("")
    for name, b in BENCHES.items():
        r = results.get(name)
        lines += [f"## {name}", "", f"{b.what}. Baseline: {b.baseline}.", ""]
        if r is None:
            if (BENCH_DIR / b.script).is_file():
                lines += ["Not run in this report" + (" (slow at full size)" if b.slow else "") + ". Run it with:", "",
                          f"    {display(command(name, False))}", "",
                          f"or smaller: `{display(command(name, True))}`" if b.quick else "", ""]
            else:
                lines += [f"`bench/{b.script}` is not in this tree yet.", ""]
            continue
        m = r["machine"]
        lines += [f"- command: `{r['command']}`" + (" (quick sizes, not the full benchmark)" if r["quick"] else ""),
                  f"- date: {r['date']}; wall time {r['wall_s']} s; commit {m.get('commit') or '-'}",
                  f"- machine: {machine_line(m)}"
                  + (f" (load average {r['load_avg_at_start']} when it started: the machine is shared)"
                     if r.get("load_avg_at_start") is not None else "")
                  + f"; {m['os']}; Python {m['python']}; "
                  + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()), ""]
        if r["returncode"] != 0:
            lines += [f"**Failed** (exit {r['returncode']}): {r['error']}", ""]
        figs = [ln for ln in r["figures"] if not LOG_LINE.match(ln)]
        if figs:
            lines += ["```", *figs, "```", ""]
        if r["result"] is not None:
            lines += ["Machine-readable result:", "", "```json", json.dumps(r["result"], indent=1), "```", ""]
    # "--" cannot appear inside an HTML comment: JSON escapes keep it out
    data = json.dumps(results, indent=1).replace("--", "-\\u002d")
    text = "\n".join(lines).rstrip() + f"\n\n{DATA_OPEN}\n{data}\n{DATA_CLOSE}\n"
    tmp = RESULTS_MD.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, RESULTS_MD)
    return text


def _names(values: list[str]) -> list[str]:
    out = [n.strip() for v in values for n in v.split(",") if n.strip()]
    unknown = [n for n in out if n not in BENCHES]
    if unknown:
        raise SystemExit(f"unknown benchmark {', '.join(unknown)}; choose from: {', '.join(BENCHES)}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", default=[], metavar="NAME", help="run only these (repeatable)")
    ap.add_argument("--skip", action="append", default=[], metavar="NAME", help="skip these (repeatable)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (said in the report)")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    ap.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md from results.json, run nothing")
    args = ap.parse_args(argv)
    if args.list:
        for name, b in BENCHES.items():
            present = "" if (BENCH_DIR / b.script).is_file() else "  (no script yet)"
            print(f"{name:18s} {b.what}{'  [slow]' if b.slow else ''}{present}")
        return 0
    only, skip = _names(args.only), set(_names(args.skip))
    todo = [n for n in (only or BENCHES) if n not in skip and (BENCH_DIR / BENCHES[n].script).is_file()]
    results = load_results()
    failed = 0
    if not args.report_only:
        m = machine()
        print(f"machine: {machine_line(m)}", flush=True)
        for name in todo:
            results[name] = run_one(name, args.quick, m)
            failed += results[name]["returncode"] != 0
            write_report(results)  # after each one: a crash or a timeout keeps what ran
    write_report(results)
    print(f"wrote {RESULTS_MD.relative_to(REPO)}" + (f"; {failed} benchmark(s) failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
