"""Read-only SQL exports, the pair export (TRL vision preference format, LLaVA JSON) and snapshots.

User SQL always passes ``storage.sqlguard.check_select`` first, then runs on its own child cursor with
Python replacement scans off, inside ``BEGIN TRANSACTION READ ONLY`` that is rolled back afterwards:
a write that somehow got past the guard fails in DuckDB itself. A ``threading.Timer`` interrupts a
query that runs past its time limit (``QueryTimeout``). File exports stream through DuckDB's own
``COPY (<checked SELECT>) TO`` (no Python row loop) into a temp file that is renamed when complete.

Pair export: DuckDB builds the rows as columns (the shapes of ``core.trl_format``, spelled in SQL) and
writes them with the same ``COPY ... TO``; image files are checked with one listing per folder and, with
``embed_images``, each read once. ``images`` is written as a list of ``{"bytes", "path"}`` structs with
the Hugging Face ``datasets`` feature metadata of ``List(Image())``, so ``datasets.load_dataset("parquet", ...)``
decodes PIL images and ``trl.DPOTrainer`` takes the dataset with no cast. The path is absolute; with
``embed_images=True`` the bytes travel inside the file (for training on another machine). JSONL keeps
plain absolute paths; load it with ``ds.cast_column("images", datasets.List(datasets.Image()))``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import duckdb
import pyarrow as pa

from core.errors import QueryTimeout, UnsafeQuery, UsageError
from storage.db import fetch_all, read_only_transaction, scalar, transaction
from storage.sqlguard import check_select

log = logging.getLogger(__name__)

DEFAULT_QUERY_TIMEOUT_S = 30.0
DEFAULT_EXPORT_TIMEOUT_S = 600.0


# ---------------------------------------------------------------- running guarded SQL

@contextmanager
def read_only_cursor(cur: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """A child cursor in a read-only transaction (rolled back on exit), Python replacement scans off."""
    q = cur.cursor()
    try:
        q.execute("SET python_enable_replacements = false")  # session-local: FROM df reads no Python object
        with read_only_transaction(q):
            yield q
    finally:
        q.close()


def _limited(cur: duckdb.DuckDBPyConnection, checked: str, limit: int | None) -> str:
    if limit is None:
        return checked
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise UsageError(f"--limit must be a whole number >= 0 (got {limit!r})")
    # Newlines keep a trailing `-- comment` from swallowing the wrapper; the result is guarded again.
    return check_select(cur, f"SELECT * FROM (\n{checked}\n) LIMIT {limit}")


def _run_with_timeout(q: duckdb.DuckDBPyConnection, timeout_s: float | None, fn: Callable[[], Any]) -> Any:
    timer = threading.Timer(timeout_s, q.interrupt) if timeout_s else None
    if timer:
        timer.daemon = True
        timer.start()
    try:
        return fn()
    except duckdb.InterruptException:
        raise QueryTimeout(f"the query ran longer than {timeout_s:g} s and was stopped; narrow it with WHERE or "
                           "--limit, or allow more time with --timeout") from None
    except duckdb.TransactionException as err:
        if "read-only" in str(err):
            raise UnsafeQuery("the query tried to write to the database; exports are read-only") from None
        raise UsageError(f"the query failed: {_first_line(err)}") from None
    except duckdb.Error as err:
        raise UsageError(f"the query failed: {_first_line(err)}") from None
    finally:
        if timer:
            timer.cancel()


def run_query(cur: duckdb.DuckDBPyConnection, sql: str, *, timeout_s: float | None = DEFAULT_QUERY_TIMEOUT_S,
              limit: int | None = None) -> pa.Table:
    """Guard ``sql``, run it read-only with a time limit and return the rows as an Arrow table."""
    final = _limited(cur, check_select(cur, sql), limit)
    with read_only_cursor(cur) as q:
        return _run_with_timeout(q, timeout_s, lambda: q.sql(final).to_arrow_table())


class QueryWriter(Protocol):
    """Writes the rows of a checked SELECT to ``path``; returns the number of rows written."""

    def __call__(self, q: duckdb.DuckDBPyConnection, checked_sql: str, path: Path) -> int: ...


def _copy_writer(options: str) -> QueryWriter:
    def write(q: duckdb.DuckDBPyConnection, checked_sql: str, path: Path) -> int:
        row = q.execute(f"COPY (\n{checked_sql}\n) TO ? ({options})", [str(path)]).fetchone()
        return int(row[0]) if row else 0
    return write


# Output format -> writer. COPY streams in DuckDB's own threads; JSON is newline-delimited.
QUERY_FORMATS: dict[str, QueryWriter] = {
    "parquet": _copy_writer("FORMAT parquet, COMPRESSION zstd"),
    "jsonl": _copy_writer("FORMAT json"),
    "csv": _copy_writer("FORMAT csv, HEADER true"),
}


def _tmp_for(out: Path) -> Path:
    return out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")


@contextmanager
def _atomic_target(out_path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temp path beside ``out_path``; renamed over it on success, removed on failure."""
    out = Path(out_path).expanduser().resolve()
    if not out.parent.is_dir():
        raise UsageError(f"cannot write {out}: folder {out.parent} does not exist")
    tmp = _tmp_for(out)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _check_format(fmt: str, registry: dict) -> None:
    if fmt not in registry:
        raise UsageError(f"unknown export format {fmt!r}; choose one of: {', '.join(registry)}")


def export_query(cur: duckdb.DuckDBPyConnection, sql: str, out_path: str | os.PathLike, fmt: str = "parquet", *,
                 timeout_s: float | None = DEFAULT_EXPORT_TIMEOUT_S, limit: int | None = None) -> int:
    """Guard ``sql`` and write all its rows (or ``limit``) to ``out_path`` as parquet/jsonl/csv; returns rows."""
    _check_format(fmt, QUERY_FORMATS)
    final = _limited(cur, check_select(cur, sql), limit)
    writer = QUERY_FORMATS[fmt]
    with _atomic_target(out_path) as tmp, read_only_cursor(cur) as q:
        n = _run_with_timeout(q, timeout_s, lambda: writer(q, final, tmp))
    log.info("exported %d rows to %s (%s)", n, out_path, fmt)
    return n


# ---------------------------------------------------------------- pair export

_PAIRS_FROM = """
    FROM pairs p
    JOIN prompts pr ON pr.prompt_id = p.prompt_id
    JOIN images i ON i.image_id = pr.image_id
    JOIN candidates c ON c.candidate_id = p.chosen_id
    JOIN candidates r ON r.candidate_id = p.rejected_id
    WHERE $round_id::INTEGER IS NULL OR p.round_id = $round_id::INTEGER"""
_PAIRS_ORDER = "ORDER BY p.round_id, p.prompt_id, p.chosen_id, p.rejected_id"


def pair_rows(cur: duckdb.DuckDBPyConnection, round_id: int | None = None) -> list[dict]:
    """Pairs (all rounds, or one) joined with their prompt, image path and both answers."""
    return fetch_all(cur, f"""
        SELECT p.round_id, p.prompt_id, p.chosen_id, p.rejected_id, p.source, p.strategy, p.margin,
               CAST(p.chosen_scores AS VARCHAR) AS chosen_scores,
               CAST(p.rejected_scores AS VARCHAR) AS rejected_scores,
               i.path AS image_path, pr.question, c.text AS chosen_text, r.text AS rejected_text
        {_PAIRS_FROM}
        {_PAIRS_ORDER}""", {"round_id": round_id})


_CONTENT = pa.list_(pa.struct([("type", pa.string()), ("text", pa.string())]))
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", _CONTENT)]))
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image storage

PROVENANCE_FIELDS: list[tuple[str, pa.DataType]] = [
    ("round_id", pa.int32()), ("prompt_id", pa.string()), ("chosen_id", pa.string()),
    ("rejected_id", pa.string()), ("source", pa.string()), ("strategy", pa.string()), ("margin", pa.float64()),
    ("chosen_scores", pa.string()), ("rejected_scores", pa.string()),
]
PAIR_SCHEMA = pa.schema([("images", pa.list_(IMAGE_STRUCT)), ("prompt", MESSAGES), ("chosen", MESSAGES),
                         ("rejected", MESSAGES), *PROVENANCE_FIELDS])


def _hf_feature(t: pa.DataType) -> dict:
    """The ``datasets`` feature dict of an Arrow type (Value / List / struct), as datasets writes it."""
    if pa.types.is_list(t):
        return {"feature": _hf_feature(t.value_type), "_type": "List"}
    if pa.types.is_struct(t):
        return {t.field(i).name: _hf_feature(t.field(i).type) for i in range(t.num_fields)}
    dtype = {pa.string(): "string", pa.int32(): "int32", pa.int64(): "int64", pa.float64(): "float64",
             pa.binary(): "binary", pa.bool_(): "bool"}[t]
    return {"dtype": dtype, "_type": "Value"}


def hf_schema(schema: pa.Schema, image_lists: tuple[str, ...] = ("images",)) -> pa.Schema:
    """``schema`` with the ``huggingface`` metadata that makes datasets decode ``image_lists`` as images."""
    features = {f.name: ({"feature": {"_type": "Image"}, "_type": "List"} if f.name in image_lists
                         else _hf_feature(f.type)) for f in schema}
    return schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})


# The rows are built as columns by DuckDB and written by its COPY (no Python object per row). The shapes
# are core.trl_format's trl_row / llava_row, spelled in SQL; tests/test_export.py checks them against it.
_IMAGE = "CASE WHEN starts_with(i.path, '/') THEN i.path ELSE $root || '/' || i.path END"
_PROMPT = ("[{'role': 'user', 'content': [{'type': 'image', 'text': NULL::VARCHAR}, "
           "{'type': 'text', 'text': pr.question}]}]")
_ANSWER = "[{{'role': 'assistant', 'content': [{{'type': 'text', 'text': {0}.text}}]}}]"
_PROVENANCE = ("p.round_id::INTEGER AS round_id, p.prompt_id, p.chosen_id, p.rejected_id, p.source, p.strategy, "
               "p.margin::DOUBLE AS margin, CAST(p.chosen_scores AS VARCHAR) AS chosen_scores, "
               "CAST(p.rejected_scores AS VARCHAR) AS rejected_scores")


def _trl_select(images: str, join: str = "") -> str:
    # The CASE keeps `images` nullable in the Parquet schema (DuckDB writes a list literal as required):
    # datasets applies the Image feature of the metadata only to a column whose Arrow field matches it.
    images = f"CASE WHEN i.path IS NULL THEN NULL ELSE {images} END"
    return (f"SELECT {images} AS images, {_PROMPT} AS prompt, {_ANSWER.format('c')} AS chosen, "
            f"{_ANSWER.format('r')} AS rejected, {_PROVENANCE} {_PAIRS_FROM.replace('WHERE', join + ' WHERE')} "
            f"{_PAIRS_ORDER}")


_LLAVA = (f"SELECT 'r' || p.round_id || ':' || p.prompt_id || ':' || p.chosen_id || ':' || p.rejected_id AS id, "
          f"{_IMAGE} AS image, [{{'from': 'human', 'value': '<image>' || chr(10) || pr.question}}] AS conversations, "
          "{'from': 'gpt', 'value': c.text} AS chosen, {'from': 'gpt', 'value': r.text} AS rejected "
          f"{_PAIRS_FROM} {_PAIRS_ORDER}")


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@dataclass(frozen=True)
class PairFormat:
    """One pair export format: the SELECT that builds its rows and the COPY options that write them."""

    select: str
    """rows in the format's shape ($root, $round_id; ``{images}`` is the table of embedded image bytes)"""
    copy_options: str
    embed: str | None = None
    """the SELECT with image bytes inside the file (``--embed-images``), or None when the format has none"""


_HF_METADATA = hf_schema(PAIR_SCHEMA).metadata[b"huggingface"].decode()

PAIR_FORMATS: dict[str, PairFormat] = {
    "parquet": PairFormat(
        _trl_select(f"[{{'bytes': NULL::BLOB, 'path': {_IMAGE}}}]"),
        f"FORMAT parquet, COMPRESSION zstd, KV_METADATA {{huggingface: {_sql_string(_HF_METADATA)}}}",
        embed=_trl_select("[{'bytes': e.data, 'path': e.name}]", "JOIN {images} e ON e.path = i.path")),
    "jsonl": PairFormat(_trl_select(f"[{_IMAGE}]"), "FORMAT json"),
    "llava": PairFormat(_LLAVA, "FORMAT json, ARRAY true"),
}
"""Pair export format -> how DuckDB builds and writes it. Parquet carries ``datasets``' feature metadata
(``images`` decode to PIL, ``trl.DPOTrainer`` takes it with no cast); JSONL and LLaVA JSON carry paths."""


def _pair_images(cur: duckdb.DuckDBPyConnection, round_id: int | None) -> list[str]:
    return [r[0] for r in cur.execute(f"SELECT DISTINCT i.path {_PAIRS_FROM}", {"round_id": round_id}).fetchall()]


def _missing(root: Path, paths: list[str]) -> list[Path]:
    """Which image files do not exist: one directory listing per folder, no stat per image."""
    by_dir: dict[Path, set[str]] = {}
    for rel in paths:
        full = root / rel
        by_dir.setdefault(full.parent, set()).add(full.name)
    missing = []
    for folder, wanted in by_dir.items():
        try:
            present = {e.name for e in os.scandir(folder) if not e.is_dir()}
        except OSError:
            present = set()
        missing.extend(folder / name for name in sorted(wanted - present))
    return missing


def export_pairs(cur: duckdb.DuckDBPyConnection, workspace_root: str | os.PathLike, out_path: str | os.PathLike,
                 fmt: str = "parquet", round_id: int | None = None, *, embed_images: bool = False) -> int:
    """Write the pairs (one round or all) in TRL's vision preference format or LLaVA JSON; returns rows.

    With no pairs yet the file is still written, empty, with the full column set.
    """
    _check_format(fmt, PAIR_FORMATS)
    spec = PAIR_FORMATS[fmt]
    if embed_images and spec.embed is None:
        what = "JSONL" if fmt == "jsonl" else "LLaVA JSON"
        raise UsageError(f"--embed-images needs --format parquet ({what} carries image paths)")
    if round_id is not None and scalar(cur, "SELECT count(*) FROM rounds WHERE round_id = ?", [round_id]) == 0:
        raise UsageError(f"round {round_id} does not exist in this workspace")
    root = Path(workspace_root).resolve()
    with read_only_cursor(cur) as q:
        paths = _pair_images(q, round_id)
        missing = _missing(root, paths)
        if missing:
            log.warning("%d pair images are missing on disk, e.g. %s", len(missing), missing[0])
            if embed_images:
                raise UsageError(f"{len(missing)} images are missing on disk (e.g. {missing[0]}); cannot embed them")
        select = spec.select
        if embed_images:  # each image read once, however many pairs show it
            name = f"_pair_images_{uuid.uuid4().hex}"
            select = spec.embed.replace("{images}", name)
            q.register(name, pa.table({"path": paths, "name": [Path(p).name for p in paths],
                                       "data": pa.array([(root / p).read_bytes() for p in paths], pa.binary())}))
        with _atomic_target(out_path) as tmp:
            params = {k: v for k, v in {"root": str(root), "round_id": round_id}.items() if f"${k}" in select}
            rows = q.execute(f"COPY (\n{select}\n) TO $out ({spec.copy_options})",
                             {**params, "out": str(tmp)}).fetchall()
    n = int(rows[0][0]) if rows else 0
    log.info("exported %d pairs to %s (%s)", n, out_path, fmt)
    return n


# ---------------------------------------------------------------- snapshot

def database_path(cur: duckdb.DuckDBPyConnection) -> Path | None:
    p = scalar(cur, "SELECT path FROM duckdb_databases() WHERE database_name = current_database()")
    return Path(p).resolve() if p else None


def _wal(p: Path) -> Path:
    return p.with_name(p.name + ".wal")


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def snapshot(cur: duckdb.DuckDBPyConnection, out_path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write a consistent copy of the current database to ``out_path`` (a DuckDB file others can open).

    One transaction copies every table, view and sequence into a freshly attached temp file, which is
    checkpointed, detached and renamed into place; the owner keeps working meanwhile.
    """
    out = Path(out_path).expanduser().resolve()
    if out == database_path(cur):
        raise UsageError(f"{out} is the workspace database itself; choose another file for the snapshot")
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise UsageError(f"cannot write {out}: folder {out.parent} does not exist")
    db = scalar(cur, "SELECT current_database()")
    alias = f"prefloop_snapshot_{uuid.uuid4().hex[:12]}"
    tmp = _tmp_for(out)
    t0 = time.perf_counter()
    try:
        cur.execute(f"ATTACH ? AS {alias}", [str(tmp)])
        try:
            with transaction(cur):
                cur.execute(f"COPY FROM DATABASE {_quote_ident(db)} TO {alias}")
            cur.execute(f"CHECKPOINT {alias}")
        finally:
            cur.execute(f"DETACH {alias}")
        if _wal(tmp).exists():
            raise UsageError(f"snapshot left a WAL file {_wal(tmp)}; the copy may be incomplete")
        _wal(out).unlink(missing_ok=True)  # a stale WAL beside the target would be replayed into the copy
        os.replace(tmp, out)
    except duckdb.Error as err:
        raise UsageError(f"snapshot failed: {_first_line(err)}") from None
    finally:
        tmp.unlink(missing_ok=True)
        _wal(tmp).unlink(missing_ok=True)
    log.info("snapshot %s written in %.2f s", out, time.perf_counter() - t0)
    return out


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
