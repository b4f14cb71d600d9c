"""The Export tab (admin): read-only SQL with saved example queries, a preview, and file downloads.

Every query goes through ``storage.export`` — the parser-based guard (``storage.sqlguard``), a read-only
transaction and a time limit — on the server; a refused query shows the guard's own message. Files
(Parquet, JSONL, CSV of a query; the pairs in TRL's vision preference format or LLaVA JSON) are written
to the app's downloads folder and offered for download. Every preview and export is in the audit log.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime

import gradio as gr
import pandas as pd
import pyarrow as pa

from app.server import AppContext
from app.server.auth import as_gr_error, require, user_of
from app.server.runner import studio_of
from core.errors import PrefloopError, UsageError
from storage import audit, export, rounds
from storage.studio import EXAMPLE_QUERIES

MAX_PREVIEW_ROWS = 10_000
DEFAULT_PREVIEW_ROWS = 100
PAIR_SUFFIX = {"parquet": ".parquet", "jsonl": ".jsonl", "llava": ".json"}
QUERY_SUFFIX = {"parquet": ".parquet", "jsonl": ".jsonl", "csv": ".csv"}
ALL_ROUNDS = "all rounds"


def _check_sql(sql: str | None) -> str:
    if not sql or not sql.strip():
        raise UsageError("write one read-only SELECT first (or pick a saved query)")
    return sql


def _audit_refusal(ctx: AppContext, user: str, sql: str, err: PrefloopError) -> None:
    with ctx.cursor() as cur:
        audit.record(cur, user, "query_refused", {"via": "app", "sql": sql[:4000], "error": str(err)[:500]})


def display_frame(table: pa.Table) -> pd.DataFrame:
    """An Arrow result as a DataFrame the Dataframe component can show: nested values as JSON text,
    binary as a byte count."""
    cols = {}
    for name, col in zip(table.column_names, table.columns):
        t = col.type
        values = col.to_pylist()
        if pa.types.is_nested(t):
            cols[name] = [None if v is None else json.dumps(v, default=str, ensure_ascii=False) for v in values]
        elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
            cols[name] = [None if v is None else f"<{len(v)} bytes>" for v in values]
        else:
            cols[name] = values
    return pd.DataFrame(cols, columns=table.column_names)


# ---------------------------------------------------------------------------------------------- handlers

@dataclass(frozen=True)
class Preview:
    """A guarded query's first rows."""

    rows: pd.DataFrame
    """at most the preview limit, shown as ``display_frame`` makes them"""
    summary: str
    """one line: how many rows (and whether the limit cut them) and how long the query took"""


@dataclass(frozen=True)
class Exported:
    """A file written for download."""

    path: str
    """the file, in the app's downloads folder (never in the workspace)"""
    summary: str
    """one line: how many rows, in which format"""


def example(ctx: AppContext, user: str | None, name: str) -> str:
    """The SQL of a saved example query."""
    require(ctx, user, "admin", "the saved queries")
    try:
        return EXAMPLE_QUERIES[name]
    except KeyError:
        raise UsageError(f"no saved query named {name!r}; choose one of: {', '.join(EXAMPLE_QUERIES)}") from None


def preview(ctx: AppContext, user: str | None, sql: str, limit=DEFAULT_PREVIEW_ROWS) -> Preview:
    """Run the guarded query with a row limit."""
    who = require(ctx, user, "admin", "running SQL")
    sql = _check_sql(sql)
    try:
        n = int(limit if limit not in (None, "") else DEFAULT_PREVIEW_ROWS)
    except (TypeError, ValueError):
        raise UsageError(f"row limit {limit!r} is not a number") from None
    if not 1 <= n <= MAX_PREVIEW_ROWS:
        raise UsageError(f"the preview shows 1 to {MAX_PREVIEW_ROWS} rows (got {n}); export the full result instead")
    t0 = time.perf_counter()
    try:
        with ctx.cursor() as cur:
            table = export.run_query(cur, sql, limit=n)
    except PrefloopError as err:
        _audit_refusal(ctx, who.name, sql, err)
        raise
    dt = time.perf_counter() - t0
    with ctx.cursor() as cur:
        audit.record(cur, who.name, "query", {"via": "app", "sql": sql[:4000], "rows": table.num_rows, "limit": n})
    more = " (the limit: there may be more)" if table.num_rows == n else ""
    return Preview(display_frame(table), f"{table.num_rows} rows{more} in {dt:.2f} s")


def export_sql(ctx: AppContext, user: str | None, sql: str, fmt: str = "parquet") -> Exported:
    """Write the whole guarded query result as parquet/jsonl/csv."""
    who = require(ctx, user, "admin", "exporting query results")
    sql = _check_sql(sql)
    if fmt not in QUERY_SUFFIX:
        raise UsageError(f"format {fmt!r}: choose one of {', '.join(QUERY_SUFFIX)}")
    out = studio_of(ctx).download_path(f"query-{datetime.now():%Y%m%d-%H%M%S}{QUERY_SUFFIX[fmt]}")
    try:
        with ctx.cursor() as cur:
            n = export.export_query(cur, sql, out, fmt)
    except PrefloopError as err:
        _audit_refusal(ctx, who.name, sql, err)
        raise
    with ctx.cursor() as cur:
        audit.record(cur, who.name, "export", {"via": "app", "pairs": False, "sql": sql[:4000], "format": fmt,
                                               "rows": n})
    return Exported(str(out), f"exported {n} rows as {fmt}")


def export_pair_file(ctx: AppContext, user: str | None, round_id=None, fmt: str = "parquet") -> Exported:
    """Write the pairs (one round or all) in TRL's vision preference format (parquet/jsonl) or LLaVA JSON."""
    who = require(ctx, user, "admin", "exporting pairs")
    if fmt not in PAIR_SUFFIX:
        raise UsageError(f"format {fmt!r}: choose one of {', '.join(PAIR_SUFFIX)}")
    rid = None
    if round_id not in (None, "", ALL_ROUNDS):
        try:
            rid = int(round_id)
        except (TypeError, ValueError):
            raise UsageError(f"round {round_id!r} is not a round number") from None
    tag = f"r{rid}" if rid is not None else "all"
    out = studio_of(ctx).download_path(f"pairs-{tag}-{datetime.now():%Y%m%d-%H%M%S}{PAIR_SUFFIX[fmt]}")
    with ctx.cursor() as cur:
        n = export.export_pairs(cur, ctx.ws.root, out, fmt, round_id=rid)
        audit.record(cur, who.name, "export", {"via": "app", "pairs": True, "round": rid, "format": fmt, "rows": n})
    return Exported(str(out), f"exported {n} pairs ({'round ' + str(rid) if rid is not None else 'all rounds'}) as {fmt}")


def round_choices(ctx: AppContext, user: str | None) -> list:
    require(ctx, user, "admin", "the pair export")
    with ctx.cursor() as cur:
        return [ALL_ROUNDS, *[str(r["round_id"]) for r in rounds.list_rounds(cur)]]


# ---------------------------------------------------------------------------------------------- the tab

def build(ctx: AppContext, demo: gr.Blocks) -> None:
    """The Export tab (role: admin)."""
    first = next(iter(EXAMPLE_QUERIES))
    with gr.Row():
        saved = gr.Dropdown(list(EXAMPLE_QUERIES), value=first, label="saved queries", elem_id="pf-sql-saved",
                            scale=2)
        limit = gr.Number(DEFAULT_PREVIEW_ROWS, label="preview rows", minimum=1, maximum=MAX_PREVIEW_ROWS,
                          precision=0, elem_id="pf-sql-limit", scale=1)
    sql = gr.Code(EXAMPLE_QUERIES[first], language="sql", label="SQL: one read-only SELECT over the workspace tables",
                  lines=10, interactive=True, elem_id="pf-sql")
    with gr.Row():
        preview_btn = gr.Button("Preview", variant="primary", elem_id="pf-sql-preview")
        fmt = gr.Radio(list(QUERY_SUFFIX), value="parquet", label="format", elem_id="pf-sql-format")
        export_btn = gr.Button("Export all rows", elem_id="pf-sql-export")
    summary = gr.Markdown(elem_id="pf-sql-summary")
    table = gr.Dataframe(label="preview", interactive=False, wrap=True, elem_id="pf-sql-table")
    query_file = gr.File(label="query export", interactive=False, height=90, elem_id="pf-sql-file")

    gr.Markdown("#### Pairs\nTRL's vision preference format (`images`, `prompt`, `chosen`, `rejected` + provenance; "
                "loads with `datasets.load_dataset('parquet', ...)`), or LLaVA JSON.")
    with gr.Row():
        pair_round = gr.Dropdown([ALL_ROUNDS], value=ALL_ROUNDS, label="round", allow_custom_value=True,
                                 elem_id="pf-pairs-round")
        pair_fmt = gr.Radio(list(PAIR_SUFFIX), value="parquet", label="format", elem_id="pf-pairs-format")
        pairs_btn = gr.Button("Export pairs", elem_id="pf-pairs-export")
    pairs_summary = gr.Markdown(elem_id="pf-pairs-summary")
    pairs_file = gr.File(label="pair export", interactive=False, height=90, elem_id="pf-pairs-file")

    def on_saved(name, request: gr.Request):
        return as_gr_error(example, ctx, user_of(request), name)

    def on_preview(sql_, limit_, request: gr.Request):
        shown = as_gr_error(preview, ctx, user_of(request), sql_, limit_)
        return {table: shown.rows, summary: shown.summary}

    def on_export(sql_, fmt_, request: gr.Request):
        done = as_gr_error(export_sql, ctx, user_of(request), sql_, fmt_)
        return {query_file: done.path, summary: done.summary}

    def on_pairs(round_, fmt_, request: gr.Request):
        done = as_gr_error(export_pair_file, ctx, user_of(request), round_, fmt_)
        return {pairs_file: done.path, pairs_summary: done.summary}

    def on_rounds(request: gr.Request):
        return gr.Dropdown(choices=as_gr_error(round_choices, ctx, user_of(request)))

    lim = {"concurrency_limit": ctx.concurrency}
    saved.input(on_saved, saved, sql, api_name="example_query", **lim)
    preview_btn.click(on_preview, [sql, limit], [table, summary], api_name="export_preview", **lim)
    export_btn.click(on_export, [sql, fmt], [query_file, summary], api_name="export_query", concurrency_limit=2)
    pairs_btn.click(on_pairs, [pair_round, pair_fmt], [pairs_file, pairs_summary], api_name="export_pairs",
                    concurrency_limit=2)
    pair_round.focus(on_rounds, None, pair_round, api_name="pair_rounds", **lim)
