"""The Data tab (admin): import prompts from an upload, run a judge in the background, see the counts,
download a snapshot of the database.

Uploads follow the rules of ``prefloop import`` (``app.importer.import_path``): a ``.jsonl`` (image
paths relative to it, so in practice a ``.parquet`` with image bytes, or a ``.zip``), a ``.parquet``,
or a ``.zip`` of a folder holding ``questions.jsonl`` and its images. A zip is unpacked into the app's
downloads folder with its members checked (no absolute paths, no ``..``, no links, a size cap).
Files offered for download (snapshots, reject reports) are written to that temp folder, never into
the workspace. Every handler checks the admin role first.
"""

from __future__ import annotations

import html
import logging
import math
import shutil
import stat
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath

import gradio as gr
import pandas as pd

from annotators.registry import DESCRIPTIONS, JUDGES
from app.importer import import_path
from app.server import AppContext
from app.server.auth import as_gr_error, require, user_of
from app.server.rounds_tab import is_admin, progress_html, run_key
from app.server.runner import start_judge, studio_of
from core.errors import ImportRejected, UsageError
from storage import audit, export, studio

log = logging.getLogger(__name__)

UPLOAD_SUFFIXES = (".jsonl", ".ndjson", ".parquet", ".zip")
MAX_ZIP_MEMBERS = 100_000
MAX_ZIP_BYTES = 4 * 1024**3
"""Uncompressed size cap of an uploaded zip (a zip bomb stops here)."""
PROBLEMS_SHOWN = 20


# ---------------------------------------------------------------------------------------------- zips

def unpack_zip(archive: Path, dest: Path) -> Path:
    """Unpack an uploaded zip safely into ``dest``; returns what to import (a folder with questions.jsonl,
    or the single .jsonl/.parquet inside)."""
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise UsageError(f"{archive.name} is not a valid zip file") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ZIP_MEMBERS:
            raise UsageError(f"{archive.name} has {len(infos)} entries; at most {MAX_ZIP_MEMBERS} are accepted")
        if sum(i.file_size for i in infos) > MAX_ZIP_BYTES:
            raise UsageError(f"{archive.name} unpacks to more than {MAX_ZIP_BYTES // 1024**3} GB")
        for info in infos:
            name = PurePosixPath(info.filename.replace("\\", "/"))
            if name.is_absolute() or ".." in name.parts or (name.parts and ":" in name.parts[0]):
                raise UsageError(f"{archive.name}: entry {info.filename!r} points outside the archive")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise UsageError(f"{archive.name}: entry {info.filename!r} is a symbolic link; links are not accepted")
        dest.mkdir(parents=True, exist_ok=True)
        zf.extractall(dest)
    return import_target(dest, archive.name)


def import_target(root: Path, shown: str) -> Path:
    """The folder with questions.jsonl (at the top or one level down), else the only .jsonl/.parquet."""
    for folder in [root, *sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("__MACOSX"))]:
        if (folder / "questions.jsonl").is_file():
            return folder
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".jsonl", ".ndjson", ".parquet")
             and "__MACOSX" not in p.parts]
    if len(files) == 1:
        return files[0]
    raise UsageError(f"{shown}: expected a folder with questions.jsonl (and its images), or one .jsonl / .parquet "
                     f"file; found {len(files)} such files")


# ---------------------------------------------------------------------------------------------- handlers

@dataclass(frozen=True)
class Imported:
    """What an upload's import did."""

    summary: str
    """one line: the file, new prompts, candidates, skipped rows"""
    reject_report: str | None = None
    """path of the bad rows' report (JSONL) in the downloads folder; None when no row was skipped"""


def import_upload(ctx: AppContext, user: str | None, upload: str | None, split: str = "train",
                  source: str | None = None, skip_bad: bool = False) -> Imported:
    """Import an uploaded file like `prefloop import`."""
    who = require(ctx, user, "admin", "importing prompts")
    if not upload:
        raise UsageError("choose a .jsonl, .parquet or .zip file to import first")
    path = Path(upload)
    if path.suffix.lower() not in UPLOAD_SUFFIXES:
        raise UsageError(f"{path.name}: upload a {', '.join(UPLOAD_SUFFIXES)} file")
    if split not in ("train", "heldout"):
        raise UsageError(f"split must be train or heldout, not {split!r}")
    st = studio_of(ctx)
    work = st.download_path("import")
    report = work.parent / f"{path.stem}.rejects.jsonl"
    target = unpack_zip(path, work) if path.suffix.lower() == ".zip" else path
    label = (source or "").strip() or path.name
    try:
        result = import_path(ctx.ws, target, skip_bad=bool(skip_bad), default_split=split, source=label,
                             progress=False, reject_report=report)
    except ImportRejected as err:
        shown = "\n".join(err.problems[:PROBLEMS_SHOWN])
        more = f"\n… and {len(err.problems) - PROBLEMS_SHOWN} more" if len(err.problems) > PROBLEMS_SHOWN else ""
        audit.record(ctx.ws.cursor(), who.name, "import_rejected", {"file": path.name, "via": "app",
                                                                    "bad_rows": len(err.problems)})
        raise UsageError(f"{path.name}: {len(err.problems)} bad rows, nothing was imported (tick 'skip bad rows' "
                         f"to import the good ones):\n{shown}{more}".replace(f"{work}/", "")
                         .replace(f"{path.parent}/", "")) from None
    finally:
        if path.suffix.lower() == ".zip":
            shutil.rmtree(work, ignore_errors=True)
    audit.record(ctx.ws.cursor(), who.name, "import", {"file": path.name, "via": "app", "source": label,
                                                       "new_prompts": result.new_prompts,
                                                       "candidates": result.candidates, "bad_rows": result.bad_rows})
    summary = f"{path.name}: {result.summary()}"
    if result.reject_report:
        summary += f"; {result.bad_rows} bad rows skipped (download the reject report)"
        return Imported(summary, str(result.reject_report))
    return Imported(summary)


def run_judge(ctx: AppContext, user: str | None, judge: str, limit=None) -> str:
    """Start a judge on the current round's unjudged candidates in the background runner."""
    who = require(ctx, user, "admin", "running a judge")
    if limit in (None, "", 0) or (isinstance(limit, float) and math.isnan(limit)):
        n = None  # all prompts
    else:
        try:
            n = int(limit)
        except (TypeError, ValueError):
            raise UsageError(f"limit {limit!r} is not a number") from None
    run = start_judge(studio_of(ctx), who.name, judge, limit=n)
    return f"{run['label']} started by {who.name}; its progress shows below"


def counts(ctx: AppContext, user: str | None) -> dict[str, pd.DataFrame]:
    """Prompts per source and split, per-round counts, judgments per round and judge."""
    require(ctx, user, "admin", "the data counts")
    with ctx.cursor() as cur:
        return {"prompts": pd.DataFrame(studio.prompt_counts(cur), columns=["source", "split", "prompts"]),
                "rounds": pd.DataFrame(studio.round_counts(cur), columns=["round_id", "status", "candidates",
                                                                         "eval_answers", "human_labels", "pairs"]),
                "judges": pd.DataFrame(studio.judge_counts(cur), columns=["round_id", "judge", "status", "judgments"])}


def make_snapshot(ctx: AppContext, user: str | None) -> str:
    """Write a consistent copy of the database (``prefloop snapshot``) to a temp file for download."""
    who = require(ctx, user, "admin", "downloading a snapshot")
    name = f"{ctx.ws.config.name}-snapshot-{datetime.now():%Y%m%d-%H%M%S}.duckdb"
    out = studio_of(ctx).download_path(name)
    with ctx.cursor() as cur:
        export.snapshot(cur, out)
        audit.record(cur, who.name, "snapshot", {"via": "app", "bytes": out.stat().st_size})
    return str(out)


def runner_status(ctx: AppContext, user: str | None) -> dict | None:
    """The runner's latest run (a judge or a round), for the Data tab's status line."""
    require(ctx, user, "admin", "the runner status")
    return studio_of(ctx).runner.snapshot()


# ---------------------------------------------------------------------------------------------- the tab

def build(ctx: AppContext, demo: gr.Blocks) -> None:
    """The Data tab (role: admin)."""
    gr.Markdown("#### Import prompts\nA `.parquet` (images as bytes or paths), a `.jsonl`, or a `.zip` of a folder "
                "with `questions.jsonl` and its images — the same rows `prefloop import` takes.")
    with gr.Row():
        upload = gr.File(label="file to import", file_types=list(UPLOAD_SUFFIXES), type="filepath",
                         elem_id="pf-upload", scale=2)
        with gr.Column(scale=1):
            split = gr.Radio(["train", "heldout"], value="train", label="split of rows that name none",
                             elem_id="pf-upload-split")
            source = gr.Textbox(label="source label (default: the file name)", elem_id="pf-upload-source")
            skip_bad = gr.Checkbox(label="skip bad rows (import the good ones)", elem_id="pf-upload-skip-bad")
            import_btn = gr.Button("Import", variant="primary", elem_id="pf-import")
    import_out = gr.Textbox(label="import result", interactive=False, lines=2, elem_id="pf-import-result")
    rejects = gr.File(label="reject report", interactive=False, visible=False, height=90, elem_id="pf-import-rejects")

    gr.Markdown("#### Run a judge\nScores the current round's candidates that this judge has not scored yet, in the "
                "background (one round or judge run at a time).")
    judge_help = "; ".join(f"**{html.escape(n)}**: {html.escape(DESCRIPTIONS.get(n, ''))}" for n in JUDGES)
    with gr.Row():
        judge = gr.Dropdown(list(JUDGES), value=next(iter(JUDGES)), label="judge", elem_id="pf-judge-pick")
        limit = gr.Number(0, label="at most N prompts (0: all)", precision=0, elem_id="pf-judge-limit")
        judge_btn = gr.Button("Run judge", elem_id="pf-judge-run")
    gr.Markdown(judge_help)
    judge_msg = gr.Markdown(elem_id="pf-judge-message")
    run_box = gr.HTML(elem_id="pf-data-run")

    gr.Markdown("#### Counts")
    reload_btn = gr.Button("Reload counts", elem_id="pf-data-reload")
    with gr.Row():
        prompts_df = gr.Dataframe(label="prompts", interactive=False, elem_id="pf-counts-prompts")
        rounds_df = gr.Dataframe(label="rounds", interactive=False, elem_id="pf-counts-rounds")
    judges_df = gr.Dataframe(label="judgments per round and judge", interactive=False, elem_id="pf-counts-judges")

    gr.Markdown("#### Snapshot\nA consistent copy of the database to open in a notebook or the duckdb CLI "
                "(`duckdb.connect(path, read_only=True)`), like `prefloop snapshot`.")
    snap_btn = gr.Button("Prepare snapshot", elem_id="pf-snapshot")
    snap_file = gr.File(label="snapshot", interactive=False, height=90, elem_id="pf-snapshot-file")
    timer = gr.Timer(1.0, active=False)
    seen = gr.State("init")

    def show_counts(c: dict[str, pd.DataFrame]) -> dict:
        """``counts`` -> its three tables."""
        return {prompts_df: c["prompts"], rounds_df: c["rounds"], judges_df: c["judges"]}

    def on_load(request: gr.Request):
        return gr.Timer(active=is_admin(ctx, user_of(request)))

    def on_tick(seen_, request: gr.Request):
        user = user_of(request)
        run = as_gr_error(runner_status, ctx, user)
        key = run_key(run)
        shown = {run_box: progress_html(run), seen: key}
        if key != seen_:  # the counts are reloaded when a run starts or finishes; else they stay as they are
            shown |= show_counts(as_gr_error(counts, ctx, user))
        return shown

    def on_import(path, split_, source_, skip_, request: gr.Request):
        done = as_gr_error(import_upload, ctx, user_of(request), path, split_, source_, skip_)
        return {import_out: done.summary,
                rejects: gr.File(value=done.reject_report, visible=done.reject_report is not None),
                **show_counts(as_gr_error(counts, ctx, user_of(request)))}

    def on_judge(judge_, limit_, request: gr.Request):
        return as_gr_error(run_judge, ctx, user_of(request), judge_, limit_)

    def on_reload(request: gr.Request):
        return show_counts(as_gr_error(counts, ctx, user_of(request)))

    def on_snapshot(request: gr.Request):
        return as_gr_error(make_snapshot, ctx, user_of(request))

    lim = {"concurrency_limit": ctx.concurrency}
    tables = [prompts_df, rounds_df, judges_df]  # output lists keep the order API clients see
    demo.load(on_load, None, timer, api_visibility="private")
    timer.tick(on_tick, seen, [run_box, seen, *tables], api_name="data_status", show_progress="hidden", **lim)
    import_btn.click(on_import, [upload, split, source, skip_bad], [import_out, rejects, *tables],
                     api_name="import_upload", concurrency_limit=2)
    judge_btn.click(on_judge, [judge, limit], judge_msg, api_name="run_judge", **lim)
    reload_btn.click(on_reload, None, tables, api_name="data_counts", **lim)
    snap_btn.click(on_snapshot, None, snap_file, api_name="snapshot", concurrency_limit=1)
