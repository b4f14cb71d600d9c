"""Run a job subprocess for the owner: its own process group, JSON-lines events, logs in the run folder.

The job never opens the database. The owner reads its events as they arrive (progress bars, live
metrics), keeps every line in ``RUN_DIR/job.log`` (stderr in ``RUN_DIR/stderr.log``), and after a clean
exit ingests the job's output files. A job that exits non-zero raises ``JobFailed`` with its last
error. The job dies with its owner (PR_SET_PDEATHSIG on Linux) and can be cancelled (its whole
process group gets SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from backend.progress import parse_line
from core.errors import JobFailed

log = logging.getLogger(__name__)

EventHandler = Callable[[dict], None]
CancelCheck = Callable[[], bool]
"""Polled while a job runs; returning True cancels the job (e.g. a `round cancel` request)."""
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class JobResult:
    returncode: int
    summary: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def torch_threads(processes: int = 1) -> int:
    """CPU threads for each torch process of a job: the cores this process may run on, less one left to
    the owner (the studio keeps answering while a job runs), shared among the job's ``processes`` (e.g.
    deepspeed ranks); at least 1. Torch's default, one thread per core in every process, oversubscribes
    the cores as soon as anything else runs (on 2 busy cores the tiny model generated 17x slower with 2
    threads than with 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, (cores - 1) // max(1, processes))


def job_env(extra: dict | None = None, processes: int = 1) -> dict:
    """The job's environment: ours, unbuffered, with the repo importable and torch's CPU threads sized
    by ``torch_threads(processes)`` (an OMP_NUM_THREADS already set, e.g. by the user, is kept)."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("OMP_NUM_THREADS", str(torch_threads(processes)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


class Job:
    """A started job; ``wait()`` streams its events to ``on_event`` and returns a JobResult."""

    def __init__(self, argv: list[str], run_dir: Path, env: dict | None = None,
                 on_event: EventHandler | None = None, cancel: CancelCheck | None = None, processes: int = 1,
                 parse: Callable[[str], dict] = parse_line):
        """``parse`` reads one stdout line into an event (``parse_line``; the multi-node launcher's output
        goes through ``backend.launch.event_parser``). The job runs in ``run_dir`` (its cwd)."""
        self.argv = argv
        self.parse = parse
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.on_event = on_event or (lambda e: None)
        self._cancelled = threading.Event()
        self._log = open(self.run_dir / "job.log", "a", encoding="utf-8")
        self._stderr = open(self.run_dir / "stderr.log", "ab")
        self._log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} $ {' '.join(argv)}\n")
        self._log.flush()
        self.started = time.time()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL,
                                     env=job_env(env, processes), cwd=str(self.run_dir), text=True, bufsize=1,
                                     preexec_fn=_die_with_parent)
        if cancel is not None:
            threading.Thread(target=self._watch, args=(cancel,), daemon=True).start()

    def _watch(self, cancel: CancelCheck, every_s: float = 0.5) -> None:
        while self.proc.poll() is None:
            if cancel():
                self.cancel()
                return
            time.sleep(every_s)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cancel(self, grace_s: float = 10.0) -> None:
        """SIGTERM the job's process group, then SIGKILL after ``grace_s``."""
        self._cancelled.set()
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def wait(self) -> JobResult:
        result = JobResult(returncode=-1)
        last_error = None
        tail: list[str] = []
        try:
            for line in self.proc.stdout:
                self._log.write(line if line.endswith("\n") else line + "\n")
                self._log.flush()
                ev = self.parse(line)
                kind = ev.get("event")
                if kind == "done":
                    result.summary = ev.get("summary", {})
                elif kind == "error":
                    last_error = ev.get("message")
                elif kind == "metrics":
                    result.metrics.append({k: v for k, v in ev.items() if k != "event"})
                elif kind == "log":
                    tail = (tail + [ev.get("message", "")])[-20:]
                self.on_event(ev)
            result.returncode = self.proc.wait()
        finally:
            result.seconds = time.time() - self.started
            self._log.close()
            self._stderr.close()
        if self._cancelled.is_set():
            raise JobFailed(f"job cancelled: {' '.join(self.argv[:3])} ...")
        if result.returncode != 0:
            if not last_error:
                last_error = _stderr_tail(self.run_dir / "stderr.log") or "\n".join(tail[-5:])
            raise JobFailed(f"job {' '.join(self.argv[1:3])} failed (exit {result.returncode}): {last_error}. "
                            f"Logs: {self.run_dir / 'job.log'}, {self.run_dir / 'stderr.log'}")
        return result


def _stderr_tail(path: Path, n: int = 6) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


def run_job(argv: list[str], run_dir: Path, env: dict | None = None,
            on_event: EventHandler | None = None) -> JobResult:
    return Job(argv, run_dir, env=env, on_event=on_event).wait()


def write_config(run_dir: Path, config: dict) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2, default=str))
    os.replace(tmp, path)
    return path
