"""The review studio (``prefloop serve``): a Gradio app over one open workspace.

Everything a tab builder or handler needs comes from an ``AppContext`` made per app instance and
passed in (closures), never module-level state: the open workspace (the database's single owner),
a clock (injectable for tests), the in-memory queue ranks and a short-lived cache for the progress
line. Other tabs keep their own per-app objects on it too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

import duckdb

from app.server.queue_cache import QueueCache
from storage.workspace import Workspace

IDLE_CAP_S = 60.0
"""Active time per item: a gap without activity longer than this is not counted."""


@dataclass
class AppContext:
    """What one running app shares between its handlers (one per ``build_app``)."""

    ws: Workspace
    clock: Callable[[], datetime] = datetime.now
    """Local naive time, like DuckDB's own timestamps; tests pass a fake clock."""
    queue: QueueCache = field(default_factory=QueueCache)
    concurrency: int = 8
    """Events of one kind that may run at once (each on its own DuckDB cursor)."""
    progress_ttl_s: float = 5.0
    """The round's progress line is recomputed at most this often (it is shown after every submit)."""
    _progress: dict = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.queue.judge is None:
            self.queue.judge = self.ws.config.pairs.judge

    def cached(self, key, compute: Callable[[], dict]) -> dict:
        """``compute()``, reused for ``progress_ttl_s`` seconds per key (display-only values)."""
        now = time.monotonic()
        with self._lock:
            hit = self._progress.get(key)
        if hit is not None and now - hit[0] < self.progress_ttl_s:
            return hit[1]
        value = compute()
        with self._lock:
            self._progress[key] = (now, value)
        return value

    @contextmanager
    def cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A fresh DuckDB cursor for this call (cursors are cheap; one per thread/call)."""
        cur = self.ws.cursor()
        try:
            yield cur
        finally:
            cur.close()

    @property
    def review(self):
        return self.ws.config.review

    @property
    def demo_model(self) -> bool:
        return self.ws.config.policy.model == "demo"
