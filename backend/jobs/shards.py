"""Resumable job outputs: every finished batch is a shard on disk, so a killed job keeps what it paid for.

A job that answers a list of inputs in batches (generate: prompts per view; critic: requests) writes
each batch's output rows to ``RUN_DIR/shards/<key>/<batch index>.parquet`` as soon as the batch is done:
written to a temporary name, fsynced, then renamed, so a reader sees a whole shard or none. ``key``
(``run_key``) hashes the run's ``config.json`` and its input rows: a shard is reused only by a run with
the same inputs and config, hence the same batches (batch i holds the same rows), and with per-request
seeds and the same batch composition, the same outputs. On start the job reads the shards of its key
(``ShardStore.load``), skips their batches, and at the end writes the shards' rows in batch order as
its one output file, which the owner ingests in one transaction as before. A shard that does not read
(cut short by a crash of the machine) or does not hold its batch's rows is ignored, counted, and its
batch runs again. The owner drops the shards of other keys before a run (``resume``: inputs or config
changed, start fresh) and all of them once it has ingested the output (``discard``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SHARDS = "shards"
UNBATCHED_CALL = 1024
"""Inputs per engine call, hence per shard, for an engine that schedules its own batches (vllm; the hf
engine's call is its ``batch_size``). vLLM seeds each request, so the split does not change the answers."""


def run_key(run_dir: Path, input_name: str) -> str:
    """The identity of a run's work: its config.json and the rows of its input Parquet (``input_name``)."""
    config = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
    rows = pq.read_table(Path(run_dir) / input_name).to_pylist()
    blob = json.dumps([config, rows], sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class ShardStore:
    """The shards of one run key: ``<folder>/<index:05d>.parquet``, each the output rows of one batch."""

    folder: Path
    """``RUN_DIR/shards/<key>``."""
    schema: pa.Schema
    """The job's output schema (every shard and the final file)."""

    @classmethod
    def open(cls, run_dir: Path, key: str, schema: pa.Schema) -> ShardStore:
        folder = Path(run_dir) / SHARDS / key
        folder.mkdir(parents=True, exist_ok=True)
        return cls(folder, schema)

    def path(self, index: int) -> Path:
        return self.folder / f"{index:05d}.parquet"

    def write(self, index: int, rows: list[dict]) -> None:
        """Make one batch's rows durable: temp file, fsync, rename (a crash leaves the old state or the new)."""
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=self.schema), sink)
        path = self.path(index)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(sink.getvalue())
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def load(self, expected: Sequence[set[tuple]], columns: Sequence[str]) -> tuple[dict[int, list[dict]], int]:
        """The rows of every usable shard by batch index, and how many shards were ignored. Shard i is usable
        when it reads and the ``columns`` of its rows are exactly ``expected[i]`` (its batch's inputs)."""
        done: dict[int, list[dict]] = {}
        ignored = 0
        for index, want in enumerate(expected):
            path = self.path(index)
            if not path.is_file():
                continue
            try:
                rows = pq.read_table(path, schema=self.schema).to_pylist()
            except (OSError, ValueError, pa.ArrowException):  # torn or foreign file: run the batch again
                ignored += 1
                continue
            if {tuple(r[c] for c in columns) for r in rows} != want:
                ignored += 1
                continue
            done[index] = rows
        return done, ignored


def resume(run_dir: Path, input_name: str, unit_columns: Sequence[str]) -> int:
    """Owner side, once config.json and the input are written: drop the shards of any other key (an earlier
    attempt with other inputs or config: start fresh) and return how many distinct ``unit_columns`` values
    (generate: prompt and view; critic: request) the shards of this run's key already hold."""
    key = run_key(run_dir, input_name)
    root = Path(run_dir) / SHARDS
    units: set[tuple] = set()
    if not root.is_dir():
        return 0
    for folder in root.iterdir():
        if folder.name != key:
            if folder.is_dir():
                shutil.rmtree(folder)
            else:
                folder.unlink()
            continue
        for path in sorted(folder.glob("*.parquet")):
            try:
                table = pq.read_table(path, columns=list(unit_columns))
            except (OSError, ValueError, pa.ArrowException):  # the job ignores it too
                continue
            units.update(zip(*(table.column(c).to_pylist() for c in unit_columns)))
    return len(units)


def discard(run_dir: Path) -> None:
    """Owner side, after ingesting the job's output: the shards are no longer needed."""
    shutil.rmtree(Path(run_dir) / SHARDS, ignore_errors=True)
