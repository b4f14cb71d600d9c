"""An append-only JSON-lines cache of paid judge replies.

One line per finished reply (``ok`` or ``invalid``: a reply that was paid for; transient errors are
never cached), keyed by ``cache_key(model, template version, image hash, question, candidate texts in
order)``. Each line is written with a single ``write`` on a file opened with ``O_APPEND``, then
flushed and fsync'd before the call returns, so a crash or Ctrl-C loses no paid reply and a re-run
pays only for the misses. A torn last line (a crash in the middle of a write) is ignored on load and
cut off before the next append. If a key appears twice, the last line wins.

Records hold no secrets: no API key, no request headers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from core.errors import PrefloopError

log = logging.getLogger(__name__)


class CacheError(PrefloopError):
    """The judge cache file cannot be read or written."""


def cache_key(model: str, template_version: str, image_hash: str, question: str,
              candidate_texts: Sequence[str]) -> str:
    """sha256 over the canonical JSON of everything that determines the reply."""
    payload = json.dumps([model, template_version, image_hash, question, list(candidate_texts)],
                         ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class JudgeCache:
    """The cache file at ``path``, loaded on construction; ``append`` is safe from several threads."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._records: dict[str, dict] = {}
        self.skipped_lines = 0
        """unreadable lines seen on load (a torn last line, or damage in the middle)"""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._load()
        except OSError as err:
            raise CacheError(f"cannot use the judge cache {self.path}: {err.strerror or err}") from None

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        keep = len(data)
        lines = data.split(b"\n")
        offset = 0
        for i, raw in enumerate(lines):
            last = i == len(lines) - 1
            start, offset = offset, offset + len(raw) + 1
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                key = rec["key"]
            except (ValueError, KeyError, TypeError):
                self.skipped_lines += 1
                if last:  # torn write: drop it so the next append starts on a clean line
                    keep = start
                    log.warning("%s: ignoring a torn last line (%d bytes) left by an interrupted write",
                                self.path, len(raw))
                else:
                    log.warning("%s: line %d is not a cache record; ignored", self.path, i + 1)
                continue
            self._records[key] = rec
            if last:  # a complete record that lost only its newline
                with open(self.path, "ab") as f:
                    f.write(b"\n")
        if keep < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(keep)

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: str) -> bool:
        return key in self._records

    def get(self, key: str) -> dict | None:
        return self._records.get(key)

    def records(self) -> Iterator[dict]:
        """Every cached record (the latest per key), in the order first written."""
        return iter(list(self._records.values()))

    def append(self, record: dict) -> None:
        """Write one record durably (write + fsync) and remember it."""
        self.extend([record])

    def extend(self, records: Sequence[dict]) -> None:
        """Write several records durably in one write + fsync (a batch job's replies) and remember them."""
        if not records:
            return
        if any("key" not in r for r in records):
            raise ValueError("a cache record needs a 'key'")
        line = "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n"
                       for r in records).encode("utf-8")
        with self._lock:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    view = memoryview(line)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as err:
                raise CacheError(f"cannot write the judge cache {self.path}: {err.strerror or err}") from None
            for record in records:
                self._records[record["key"]] = record
