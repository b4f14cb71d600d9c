"""Readers for ``prefloop import``: each turns one kind of input into raw rows of the import format.

Accepted inputs (``SOURCES``, tried in order):

- ``jsonl``: a ``.jsonl`` / ``.ndjson`` file, one JSON object per line (blank lines are skipped);
  relative image paths resolve against the file's folder.
- ``folder``: a folder holding ``questions.jsonl`` (same rows); image paths are relative to the folder.
- ``parquet``: a ``.parquet`` file; relative image paths resolve against its folder.
- ``datasets``: a folder written by ``datasets.Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``;
  in a DatasetDict, rows without a ``split`` value get ``train`` from a split named train and
  ``heldout`` from one named test / validation / valid / heldout / eval.

Row keys (JSONL keys, or table columns): ``image`` (required), ``question`` (required; ``prompt`` is
accepted as its other name), and optional ``id``, ``split``, ``meta``, ``reference``, ``candidates``,
``chosen``, ``rejected``. In a table the ``image`` column may hold a struct ``{"bytes", "path"}``
(``datasets.Image``), raw bytes, or a path string; ``meta`` may be a struct or JSON text; other
columns are ignored. In JSONL an unknown key is an error (put extra fields in ``meta``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from core.errors import UsageError

log = logging.getLogger(__name__)

ROW_KEYS = ("image", "question", "prompt", "id", "split", "meta", "reference", "candidates", "chosen", "rejected")
FOLDER_FILE = "questions.jsonl"
HELDOUT_SPLIT_NAMES = {"test", "validation", "valid", "heldout", "eval"}


@dataclass
class RawRow:
    """One input row before validation."""

    where: str                    # "data.jsonl line 3" / "data.parquet row 7": prefix of every message
    line: int                     # JSONL line (1-based) or table row index (0-based, like ds[i])
    fields: dict | None           # the parsed row; None when it could not be parsed
    error: str | None = None      # why it could not be parsed
    raw: Any = None               # JSON-able original, for the reject report


@dataclass
class Opened:
    """An input opened by a Source: where relative paths resolve, and its rows."""

    kind: str
    path: Path
    base_dir: Path                # relative image paths resolve here; images must stay inside it
    total: int | None             # rows to expect (for the progress bar), when cheap to know
    rows: Iterator[RawRow]


class Source(Protocol):
    def matches(self, path: Path) -> bool: ...

    def open(self, path: Path) -> Opened: ...


# ---------------------------------------------------------------------------------------------- JSONL

def _jsonl_rows(path: Path, display: str) -> Iterator[RawRow]:
    with open(path, "rb") as f:
        for n, raw_line in enumerate(f, start=1):
            where = f"{display} line {n}"
            try:
                text = raw_line.decode("utf-8")
            except UnicodeDecodeError as err:
                yield RawRow(where, n, None, f"not UTF-8 text ({err.reason} at byte {err.start})",
                             raw_line.decode("utf-8", "replace"))
                continue
            if n == 1:
                text = text.lstrip("\ufeff")
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                yield RawRow(where, n, None, f"invalid JSON: {err.msg} (column {err.colno})", text.rstrip("\n"))
                continue
            if not isinstance(obj, dict):
                yield RawRow(where, n, None, f"expected a JSON object, got {type(obj).__name__}", obj)
                continue
            yield RawRow(where, n, obj, raw=obj)


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


class JsonlSource:
    def matches(self, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() in (".jsonl", ".ndjson")

    def open(self, path: Path) -> Opened:
        return Opened("jsonl", path, path.parent, _count_lines(path), _jsonl_rows(path, str(path)))


class FolderSource:
    def matches(self, path: Path) -> bool:
        return path.is_dir() and (path / FOLDER_FILE).is_file()

    def open(self, path: Path) -> Opened:
        qfile = path / FOLDER_FILE
        return Opened("folder", path, path, _count_lines(qfile), _jsonl_rows(qfile, str(qfile)))


# ---------------------------------------------------------------------------------------------- tables

def _json_safe(value: Any) -> Any:
    """A table value for the reject report (image bytes shown by size)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _check_columns(names: list[str], display: str) -> list[str]:
    if "image" not in names:
        raise UsageError(f"{display} has no `image` column (columns: {', '.join(names)}); expected an image "
                         f"column (bytes, a {{bytes, path}} struct, or a path) and a question or prompt column")
    if "question" not in names and "prompt" not in names:
        raise UsageError(f"{display} has no `question` or `prompt` column (columns: {', '.join(names)})")
    ignored = [c for c in names if c not in ROW_KEYS or (c == "prompt" and "question" in names)]
    if ignored:
        log.info("%s: ignoring columns %s", display, ", ".join(ignored))
    return [c for c in names if c in ROW_KEYS and c not in ignored]


def _table_rows(batches: Iterator, display: str, columns: list[str], split_hint: str | None = None,
                start: int = 0) -> Iterator[RawRow]:
    i = start
    for batch in batches:
        for row in batch.select(columns).to_pylist():
            if isinstance(row.get("meta"), str):
                try:
                    row["meta"] = json.loads(row["meta"])
                except json.JSONDecodeError:
                    pass  # validation reports "meta must be an object"
            fields = {k: v for k, v in row.items() if v is not None}
            if split_hint and "split" not in fields:
                fields["split"] = split_hint
            yield RawRow(f"{display} row {i}", i, fields, raw=_json_safe(row))
            i += 1


class ParquetSource:
    def matches(self, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() in (".parquet", ".pq")

    def open(self, path: Path) -> Opened:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError...
            raise UsageError(f"cannot read {path} as Parquet: {err}") from None
        columns = _check_columns(pf.schema_arrow.names, str(path))
        rows = _table_rows(pf.iter_batches(batch_size=512, columns=columns), str(path), columns)
        return Opened("parquet", path, path.parent, pf.metadata.num_rows, rows)


def _split_hint(name: str) -> str | None:
    if name == "train":
        return "train"
    return "heldout" if name in HELDOUT_SPLIT_NAMES else None


class DatasetsDiskSource:
    def matches(self, path: Path) -> bool:
        return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())

    def open(self, path: Path) -> Opened:
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:  # noqa: BLE001 - datasets raises many kinds
            raise UsageError(f"cannot load {path} with datasets.load_from_disk: {err}") from None
        parts = []  # (display name, split hint, dataset, columns to read)
        for name, ds in (loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]):
            display = str(path / name) if name else str(path)
            parts.append((display, _split_hint(name) if name else None, ds, _check_columns(ds.column_names, display)))

        def rows() -> Iterator[RawRow]:
            for display, hint, ds, columns in parts:
                yield from _table_rows(iter(ds.data.table.to_batches(max_chunksize=512)), display, columns,
                                       split_hint=hint)

        return Opened("datasets", path, path, sum(len(p[2]) for p in parts), rows())


# Tried in order; the first whose ``matches`` is true reads the input.
SOURCES: dict[str, Source] = {
    "jsonl": JsonlSource(),
    "folder": FolderSource(),
    "datasets": DatasetsDiskSource(),
    "parquet": ParquetSource(),
}


def open_source(path: Path) -> Opened:
    """Open an import input with the first matching source; UsageError if none fits."""
    if not path.exists():
        raise UsageError(f"{path}: no such file or folder")
    for source in SOURCES.values():
        if source.matches(path):
            return source.open(path)
    raise UsageError(f"cannot import {path}: expected a .jsonl file, a folder with {FOLDER_FILE}, a .parquet "
                     f"file, or a folder written by datasets save_to_disk")
