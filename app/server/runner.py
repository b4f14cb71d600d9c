"""The studio's background runner: one round or judge run at a time, in a thread owned by the app.

``Studio`` is the admin side's per-app object (made once per ``AppContext`` by ``studio_of`` and kept
on it, never module-level): the ``Runner``, the folder downloads are written to, and the lock that
serializes forwarded CLI commands. The runner's thread only waits: the heavy work (generation,
training, eval, the critic) runs in job subprocesses, so the app stays responsive. The Rounds and
Data tabs poll ``Runner.snapshot()`` (in memory, cheap) for the step, a progress fraction and the
last log lines; a forwarded ``prefloop round start`` uses the same runner, so the Rounds tab shows it.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from app.server import AppContext
from backend import loop
from core.errors import PrefloopError, UsageError
from storage import audit
from storage.workspace import Workspace

log = logging.getLogger(__name__)

LOG_LINES = 200
"""Log lines kept per run (the tabs show the last few)."""

Work = Callable[[Callable[[dict], None]], str]
"""What a run does: called with an event handler, returns the message shown when it finished."""


class Busy(UsageError):
    """Another run (round or judge) is in progress; one at a time."""


@dataclass
class Run:
    """One background run and what the tabs show of it (mutated only under the runner's lock)."""

    run_id: int
    kind: str                       # "round" | "judge"
    label: str
    user: str
    started_at: float
    status: str = "running"         # running | done | failed | cancelled
    message: str = ""
    round_id: int | None = None
    step: str | None = None
    progress: tuple[int, int, str] | None = None   # (done, total, unit) of the current step
    finished_at: float | None = None
    lines: deque = field(default_factory=lambda: deque(maxlen=LOG_LINES))

    def view(self) -> dict:
        d = {k: getattr(self, k) for k in ("run_id", "kind", "label", "user", "started_at", "status", "message",
                                           "round_id", "step", "progress", "finished_at")}
        d["lines"] = list(self.lines)
        d["seconds"] = round((self.finished_at or time.time()) - self.started_at, 1)
        return d


def event_line(ev: dict) -> str | None:
    """A job or loop event as one log line (None for pure progress updates)."""
    kind = ev.get("event")
    if kind == "step":
        extra = f" ({ev.get('seconds')} s)" if ev.get("status") == "done" else ""
        return f"round {ev.get('round_id')}: {ev.get('step')} {ev.get('status')}{extra}"
    if kind == "metrics":
        parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in ev.items()
                 if k in ("step", "loss", "margin", "accuracy", "lr") and v is not None]
        return "  train " + "  ".join(parts)
    if kind == "log":
        return f"  {ev.get('message', '')}"
    if kind == "error":
        return f"  job error: {ev.get('message', '')}"
    return None


class Runner:
    """Runs one ``Work`` at a time in a daemon thread and keeps its events for the tabs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._run: Run | None = None
        self._thread: threading.Thread | None = None
        self._seq = 0

    def _claim(self, kind: str, label: str, user: str) -> Run:
        with self._lock:
            cur = self._run
            if cur is not None and cur.status == "running":
                raise Busy(f"a {cur.kind} is already running ({cur.label}, started by {cur.user} "
                           f"{time.time() - cur.started_at:.0f} s ago); wait for it or cancel it")
            self._seq += 1
            self._run = Run(self._seq, kind, label, user, time.time())
            return self._run

    def start(self, kind: str, label: str, user: str, work: Work) -> dict:
        """Start ``work`` in the background; raises Busy while another run is in progress."""
        run = self._claim(kind, label, user)
        t = threading.Thread(target=self._main, args=(run, work), name=f"prefloop-{kind}-{run.run_id}", daemon=True)
        self._thread = t
        t.start()
        return run.view()

    @contextmanager
    def hold(self, kind: str, label: str, user: str) -> Iterator[Callable[[dict], None]]:
        """Run in the caller's thread while holding the runner (a forwarded ``prefloop judge``)."""
        run = self._claim(kind, label, user)
        try:
            yield lambda ev: self._event(run, ev)
        except BaseException as err:
            self._finish(run, "failed", str(err) or type(err).__name__)
            raise
        self._finish(run, "done", "finished")

    def _main(self, run: Run, work: Work) -> None:
        try:
            message = work(lambda ev: self._event(run, ev))
            self._finish(run, "done", message)
        except loop.Cancelled as err:
            self._finish(run, "cancelled", str(err))
        except PrefloopError as err:
            self._finish(run, "failed", str(err))
        except BaseException as err:  # a bug: keep the traceback in the server log, show one line
            log.exception("%s run %d failed", run.kind, run.run_id)
            self._finish(run, "failed", f"{type(err).__name__}: {err}")

    def _event(self, run: Run, ev: dict) -> None:
        line = event_line(ev)
        with self._lock:
            if ev.get("event") == "step":
                run.round_id, run.step = ev.get("round_id"), ev.get("step")
                run.progress = None
            elif ev.get("event") == "progress":
                run.progress = (int(ev.get("done") or 0), int(ev.get("total") or 0), str(ev.get("unit") or ""))
            if line is not None:
                run.lines.append(line)

    def _finish(self, run: Run, status: str, message: str) -> None:
        with self._lock:
            run.status, run.message, run.finished_at = status, message, time.time()
            run.lines.append(f"{status}: {message}")
        log.info("%s run %d %s: %s", run.kind, run.run_id, status, message)

    def snapshot(self) -> dict | None:
        """The latest run (running or finished) as a plain dict, or None before the first run."""
        with self._lock:
            return self._run.view() if self._run is not None else None

    def busy(self) -> bool:
        with self._lock:
            return self._run is not None and self._run.status == "running"

    def wait(self, timeout: float | None = None) -> dict | None:
        """Wait for the background thread (tests, shutdown); returns the latest run."""
        t = self._thread
        if t is not None:
            t.join(timeout)
        return self.snapshot()


@dataclass
class Studio:
    """The admin side's state for one app: the runner, the downloads folder, the forwarding lock."""

    ctx: AppContext
    runner: Runner = field(default_factory=Runner)
    downloads: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="prefloop-downloads-")))
    forward_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.downloads.chmod(0o700)
        weakref.finalize(self, shutil.rmtree, str(self.downloads), True)

    def download_path(self, name: str, max_age_s: float = 6 * 3600.0) -> Path:
        """A fresh file path in the downloads folder (Gradio copies it to its cache when returned);
        older files are removed first."""
        now = time.time()
        for p in self.downloads.iterdir():
            try:
                if now - p.stat().st_mtime > max_age_s:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            except OSError:
                pass
        folder = Path(tempfile.mkdtemp(dir=self.downloads))
        return folder / name


def studio_of(ctx: AppContext) -> Studio:
    """The app's ``Studio``, made on first use and kept on its AppContext (tabs are built in one thread)."""
    studio = ctx.__dict__.get("_studio")
    if studio is None:
        studio = ctx.__dict__.setdefault("_studio", Studio(ctx))
    return studio


# ------------------------------------------------------------------------------------------- round runs

def start_round(studio: Studio, actor: str, plan: loop.RoundRun | None = None, *, via: str = "app") -> dict:
    """Run a round start or resume (``backend.loop.start_round`` / ``resume_round``; by default one round
    on the app's workspace) in the background; audited. Raises Busy.

    The plan's workspace may be a copy of the app's with its own config (a forwarded ``--recipe``); it
    shares the app's connection.
    """
    plan = plan or loop.start_round(studio.ctx.ws)
    run = studio.runner.start("round", plan.label, actor, lambda on_event: loop.outcome(plan.run(on_event)))
    plan.record(actor, via)
    return run


def cancel_round(studio: Studio, actor: str, *, via: str = "app") -> str:
    """Ask the running round to stop (``backend.loop.request_cancel``); audited."""
    ws = studio.ctx.ws
    snap = studio.runner.snapshot()
    running = snap is not None and snap["status"] == "running" and snap["kind"] == "round"
    loop.request_cancel(ws.root)
    audit.record(ws.cursor(), actor, "round.cancel", {"via": via, "running": running,
                                                      "round_id": snap["round_id"] if snap else None})
    if not running:
        return "no round is running in the app; the cancel request stops a round started from the CLI, if any"
    return "cancel requested: the running job stops shortly; Start round (or `prefloop round resume`) continues later"


def workspace_copy(ws: Workspace) -> Workspace:
    """A view of the app's workspace with its own ``config`` (shares the connection and its lock)."""
    return copy.copy(ws)


# ------------------------------------------------------------------------------------------- judge runs

def start_judge(studio: Studio, actor: str, judge: str, *, limit: int | None = None, retry_invalid: bool = False,
                via: str = "app") -> dict:
    """Run a judge on the current round's unjudged candidates in the background; audited on finish."""
    from annotators.registry import JUDGES
    from backend.steps.judge import run_judge

    if judge not in JUDGES:
        raise UsageError(f"unknown judge {judge!r}; choose one of: {', '.join(JUDGES)}")
    if limit is not None and limit < 1:
        raise UsageError(f"limit {limit}: give a number of prompts, or 0 for all")
    ws = studio.ctx.ws

    def work(on_event: Callable[[dict], None]) -> str:
        s = run_judge(ws, judge, limit=limit, retry_invalid=retry_invalid, on_event=on_event)
        audit.record(ws.cursor(), actor, "judge", {"via": via, **{k: v for k, v in s.items() if k != "message"}})
        if s.get("message"):
            return s["message"]
        return (f"round {s['round_id']}: {s['judge']} judged {s['candidates']} candidates of {s['prompts']} prompts: "
                f"{s['ok']} ok, {s['invalid']} invalid, {s['error']} error in {s['seconds']} s")

    return studio.runner.start("judge", f"judge {judge}", actor, work)
