"""Import prompts (image + question), with optional candidates and a preference, into a workspace.

``import_path`` is what the CLI (``prefloop import``) and the app call. It runs in two phases:

1. plan: read every row (see ``app.import_sources`` for the accepted inputs), check its fields, read,
   hash and fully decode its image, and resolve duplicates against the input and the workspace.
   Nothing is written to the database; new images are parked in a staging folder.
2. write: move the staged images into the content-addressed store, then insert images, prompts,
   candidates and labels in ONE transaction with bulk inserts.

By default a single bad row rejects the whole import (``ImportRejected`` lists every bad row, each
naming the file and line). With ``skip_bad`` the good rows are imported and the bad ones go to a
reject report (JSONL of ``{line, where, error, row}``).

Re-importing is idempotent: prompt ids are the row's ``id`` or a hash of (image sha, question),
candidate ids a hash of (prompt id, index, text), and an (image, question) already in the workspace
is counted as "already present" and left unchanged (its candidates and preference are still added
when new). Questions are stored with surrounding whitespace stripped.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
from tqdm import tqdm

from app.import_sources import ROW_KEYS, RawRow, open_source
from core.errors import ImportRejected, PrefloopError, UsageError
from storage import images as images_db
from storage import prompts as prompts_db
from storage import rounds
from storage.images import BadImage, ImageStager
from storage.workspace import Workspace

log = logging.getLogger(__name__)

SPLITS = ("train", "heldout")
IMPORT_ANNOTATOR = "import"


@dataclass
class ImportResult:
    """Counts of one import. ``problems`` lists bad rows ("FILE line N: why")."""

    path: Path
    source: str
    rows: int = 0
    new_prompts: int = 0
    already_present: int = 0
    repeated: int = 0
    images_stored: int = 0
    candidates: int = 0
    preferences: int = 0
    problems: list[str] = field(default_factory=list)
    reject_report: Path | None = None
    seconds: float = 0.0

    @property
    def bad_rows(self) -> int:
        return len(self.problems)

    @property
    def rate(self) -> float:
        """Rows per second over the whole import (read, validate, write)."""
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        parts = [f"{self.new_prompts} new prompts", f"{self.already_present} already present"]
        if self.repeated:
            parts.append(f"{self.repeated} repeated in the input")
        parts += [f"{self.images_stored} images stored", f"{self.candidates} candidates",
                  f"{self.preferences} preferences"]
        if self.problems:
            parts.append(f"{self.bad_rows} bad rows skipped")
        return (", ".join(parts) + f" ({self.rows} rows in {self.seconds:.1f} s, {self.rate:,.0f} rows/s)")


@dataclass
class _Row:
    """A row whose fields and image passed every check."""

    raw: RawRow
    order: int
    image_id: str
    question: str
    given_id: str | None
    split: str
    reference: str | None
    meta: dict | None
    candidates: list[str]
    chosen: int | None
    rejected: int | None


@dataclass
class ImportPlan:
    """Everything an import will write, built without touching the database."""

    result: ImportResult
    images: list[dict]
    prompts: list[dict]
    candidates: list[dict]
    labels: list[dict]
    rejects: list[dict]
    stager: ImageStager


# ---------------------------------------------------------------------------------------------- fields

def _type_name(v: Any) -> str:
    return type(v).__name__


def _index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_preference(f: dict, cands: list[str] | None, errors: list[str]) -> tuple[list[str], int | None, int | None]:
    chosen, rejected = f.get("chosen"), f.get("rejected")
    if chosen is None and rejected is None:
        return cands or [], None, None
    if chosen is None or rejected is None:
        errors.append(f"chosen and rejected go together (got only {'chosen' if rejected is None else 'rejected'})")
        return cands or [], None, None
    if isinstance(chosen, str) and isinstance(rejected, str):
        if cands:
            errors.append("chosen/rejected must be indexes into candidates when candidates are given")
        elif not chosen.strip() or not rejected.strip():
            errors.append("chosen and rejected answers must not be empty")
        elif chosen == rejected:
            errors.append("chosen and rejected are the same text")
        else:
            return [chosen, rejected], 0, 1
        return cands or [], None, None
    if not (_index(chosen) and _index(rejected)):
        errors.append(f"chosen and rejected must be integer indexes into candidates (or two answer strings), "
                      f"got {_type_name(chosen)} and {_type_name(rejected)}")
        return cands or [], None, None
    if not cands:
        errors.append("chosen/rejected are indexes into candidates, but the row has no candidates")
        return [], None, None
    for name, i in (("chosen", chosen), ("rejected", rejected)):
        if not 0 <= i < len(cands):
            errors.append(f"{name} index {i} is out of range for {len(cands)} candidates (0..{len(cands) - 1})")
    if chosen == rejected:
        errors.append(f"chosen and rejected are the same candidate ({chosen})")
    if errors:
        return cands, None, None
    return cands, chosen, rejected


def check_fields(f: dict, default_split: str) -> tuple[dict, list[str]]:
    """Check a row's fields; returns (clean values, problems). The image itself is checked elsewhere."""
    errors: list[str] = []
    unknown = sorted(set(f) - set(ROW_KEYS))
    if unknown:
        errors.append(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                      f"(allowed: {', '.join(k for k in ROW_KEYS if k != 'prompt')}; put extra fields in meta)")
    if "question" in f and "prompt" in f:
        errors.append("give question or prompt, not both")
    question = f.get("question", f.get("prompt"))
    if question is None:
        errors.append("missing question")
    elif not isinstance(question, str):
        errors.append(f"question must be a string, got {_type_name(question)}")
    elif not question.strip():
        errors.append("empty question")
    if f.get("image") is None:
        errors.append("missing image")
    given_id = f.get("id")
    if given_id is not None:
        if _index(given_id):
            given_id = str(given_id)
        if not isinstance(given_id, str) or not given_id.strip():
            errors.append(f"id must be a non-empty string, got {given_id!r}")
    split = f.get("split", default_split)
    if split not in SPLITS:
        errors.append(f"split must be train or heldout, got {split!r}")
    meta = f.get("meta")
    if meta is not None and not isinstance(meta, dict):
        errors.append(f"meta must be an object, got {_type_name(meta)}")
    reference = f.get("reference")
    if reference is not None and not isinstance(reference, str):
        errors.append(f"reference must be a string, got {_type_name(reference)}")
    cands = f.get("candidates")
    if cands is not None:
        if not isinstance(cands, list) or not all(isinstance(c, str) for c in cands):
            bad = _type_name(cands) if not isinstance(cands, list) else \
                next(f"item {i} is {_type_name(c)}" for i, c in enumerate(cands) if not isinstance(c, str))
            errors.append(f"candidates must be a list of strings ({bad})")
            cands = None
        else:
            empty = [i for i, c in enumerate(cands) if not c.strip()]
            if empty:
                errors.append(f"candidate {empty[0]} is empty")
    cands, chosen, rejected = _check_preference(f, cands, errors)
    clean = {"question": question.strip() if isinstance(question, str) else question, "given_id": given_id,
             "split": split, "reference": reference, "meta": meta, "candidates": cands, "chosen": chosen,
             "rejected": rejected}
    return clean, errors


# ---------------------------------------------------------------------------------------------- images

@dataclass
class _ImageChecker:
    """Reads, hashes and decodes images once each (cached by path and by content hash)."""

    base_dir: Path
    allow_outside: bool
    max_megapixels: float
    stager: ImageStager
    by_path: dict[str, tuple[str, str] | str] = field(default_factory=dict)
    by_sha: dict[str, dict | str] = field(default_factory=dict)

    def check(self, value: Any) -> tuple[str, str] | str:
        """(image_id, store path) or a problem message."""
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                value = value["bytes"]
            elif value.get("path") is not None:
                value = value["path"]
            else:
                return "image has neither bytes nor path"
        if isinstance(value, (bytes, bytearray, memoryview)):
            return self._check_bytes(bytes(value), "image bytes")
        if not isinstance(value, str):
            return f"image must be a path string or image bytes, got {_type_name(value)}"
        if not value.strip():
            return "empty image path"
        if value not in self.by_path:
            full = Path(value) if os.path.isabs(value) else self.base_dir / value
            self.by_path[value] = self._check_path(value, full)
        return self.by_path[value]

    def _check_path(self, value: str, full: Path) -> tuple[str, str] | str:
        if not self.allow_outside:
            base = self.base_dir.resolve()
            real = full.resolve()
            if not real.is_relative_to(base):
                lexical = Path(os.path.abspath(full))
                if lexical.is_relative_to(Path(os.path.abspath(self.base_dir))):
                    return (f"image {value} is (or goes through) a symlink to {real}, outside the import "
                            f"folder {base}; pass --allow-outside to allow it")
                return (f"image path {value} resolves to {real}, outside the import folder {base}; "
                        f"pass --allow-outside to allow it")
        try:
            data = full.read_bytes()
        except FileNotFoundError:
            return f"image not found: {full}"
        except IsADirectoryError:
            return f"image path is a folder, not a file: {full}"
        except PermissionError:
            return f"cannot read image {full}: permission denied"
        except OSError as err:
            return f"cannot read image {full}: {err.strerror or err}"
        return self._check_bytes(data, f"image {value}")

    def _check_bytes(self, data: bytes, name: str) -> tuple[str, str] | str:
        sha = images_db.sha256_hex(data)
        if sha not in self.by_sha:
            try:
                info = images_db.probe_image(data, self.max_megapixels)
            except BadImage as err:
                self.by_sha[sha] = str(err)
            else:
                relpath = images_db.store_relpath(sha, info.format)
                self.stager.add(relpath, data)
                self.by_sha[sha] = {"image_id": sha, "path": relpath, "width": info.width, "height": info.height,
                                    "format": info.format, "n_bytes": len(data)}
        got = self.by_sha[sha]
        if isinstance(got, str):
            return f"{name}: {got}"
        return sha, got["path"]


# ---------------------------------------------------------------------------------------------- plan

def _read_rows(path: Path, *, allow_outside: bool, max_megapixels: float, default_split: str,
               progress: bool, stager: ImageStager) -> tuple[list[_Row], list[tuple[int, RawRow, str]], int, dict]:
    opened = open_source(path)
    checker = _ImageChecker(opened.base_dir, allow_outside, max_megapixels, stager)
    good: list[_Row] = []
    bad: list[tuple[int, RawRow, str]] = []
    n = 0
    bar = tqdm(opened.rows, total=opened.total, unit="row", desc="checking", file=sys.stderr, leave=False,
               disable=not progress or not sys.stderr.isatty())
    for n, raw in enumerate(bar, start=1):
        if raw.fields is None:
            bad.append((n, raw, raw.error or "unreadable row"))
            continue
        clean, errors = check_fields(raw.fields, default_split)
        image = checker.check(raw.fields["image"]) if raw.fields.get("image") is not None else None
        if isinstance(image, str):
            errors.append(image)
        if errors:
            bad.append((n, raw, "; ".join(errors)))
            continue
        good.append(_Row(raw=raw, order=n, image_id=image[0], **clean))
    return good, bad, n, checker.by_sha


def plan_import(ws: Workspace, path: str | os.PathLike, *, allow_outside: bool = False,
                max_megapixels: float = images_db.DEFAULT_MAX_MEGAPIXELS, default_split: str = "train",
                source: str | None = None, progress: bool = True) -> ImportPlan:
    """Phase 1: read and check every row and decide what to write (reads the database, writes nothing).

    The caller must ``apply_plan`` or ``plan.stager.discard()`` the staged images.
    """
    if default_split not in SPLITS:
        raise UsageError(f"--split must be train or heldout, got {default_split!r}")
    if max_megapixels <= 0:
        raise UsageError(f"--max-megapixels must be positive, got {max_megapixels}")
    path = Path(path).expanduser()
    result = ImportResult(path=path, source=source or path.resolve().name)
    stager = ImageStager(ws.root)
    try:
        good, bad, result.rows, images = _read_rows(
            path, allow_outside=allow_outside, max_megapixels=max_megapixels, default_split=default_split,
            progress=progress, stager=stager)
        if result.rows == 0:
            raise UsageError(f"{path} has no rows to import")
        plan = _resolve(ws, result, good, bad, images, stager)
    except BaseException:
        stager.discard()
        raise
    return plan


def _resolve(ws: Workspace, result: ImportResult, good: list[_Row], bad: list[tuple[int, RawRow, str]],
             images: dict[str, dict | str], stager: ImageStager) -> ImportPlan:
    """Dedup against the input and the workspace; build the rows to insert."""
    cur = ws.cursor()
    in_db = prompts_db.existing_prompt_keys(cur, list({(r.image_id, r.question) for r in good}))
    wanted_ids = {r.given_id or prompts_db.make_prompt_id(r.image_id, r.question) for r in good}
    ids_in_db = prompts_db.existing_prompt_ids(cur, list(wanted_ids))

    seen_keys: dict[tuple[str, str], str] = {}
    id_lines: dict[str, str] = {}
    new_prompts, accepted = [], []
    for r in good:
        key = (r.image_id, r.question)
        if key in in_db:
            result.already_present += 1
            prompt_id = in_db[key]
        elif key in seen_keys:
            result.repeated += 1
            prompt_id = seen_keys[key]
        else:
            prompt_id = r.given_id or prompts_db.make_prompt_id(r.image_id, r.question)
            if prompt_id in id_lines:
                bad.append((r.order, r.raw, f"id {prompt_id!r} is already used by {id_lines[prompt_id]}"))
                continue
            if prompt_id in ids_in_db:
                why = (f"id {prompt_id!r} already belongs to another prompt in the workspace "
                       f"(question {ids_in_db[prompt_id][1]!r})")
                bad.append((r.order, r.raw, why))
                continue
            id_lines[prompt_id] = r.raw.where
            seen_keys[key] = prompt_id
            new_prompts.append({"prompt_id": prompt_id, "image_id": r.image_id, "question": r.question,
                                "source": result.source, "split": r.split, "reference": r.reference,
                                "meta": r.meta})
        accepted.append((prompt_id, r))

    candidates, labels = _candidates_and_labels(cur, accepted)
    used = {r.image_id for _, r in accepted}
    image_rows = [images[sha] for sha in sorted(used)]
    bad.sort(key=lambda b: b[0])
    result.problems = [f"{raw.where}: {error}" for _, raw, error in bad]
    rejects = [{"line": raw.line, "where": raw.where, "error": error, "row": raw.raw} for _, raw, error in bad]
    return ImportPlan(result=result, images=image_rows, prompts=new_prompts, candidates=candidates,
                      labels=labels, rejects=rejects, stager=stager)


def _candidates_and_labels(cur, accepted: list[tuple[str, _Row]]) -> tuple[list[dict], list[dict]]:
    if not any(r.candidates for _, r in accepted):
        return [], []
    try:
        round_id = rounds.current_round(cur)["round_id"]
    except RuntimeError as err:
        raise UsageError(f"cannot import candidates: {err}") from None
    candidates: dict[str, dict] = {}
    labels: dict[tuple[str, str, str], dict] = {}
    for prompt_id, r in accepted:
        ids = [prompts_db.make_candidate_id(prompt_id, i, text) for i, text in enumerate(r.candidates)]
        for i, (cid, text) in enumerate(zip(ids, r.candidates)):
            candidates.setdefault(cid, {"candidate_id": cid, "prompt_id": prompt_id, "round_id": round_id,
                                        "text": text, "origin": "imported", "sample_index": i})
        if r.chosen is not None:
            key = (prompt_id, ids[r.chosen], ids[r.rejected])
            labels.setdefault(key, {"prompt_id": prompt_id, "round_id": round_id, "annotator": IMPORT_ANNOTATOR,
                                    "source": "imported", "chosen_id": key[1], "rejected_id": key[2]})
    return list(candidates.values()), list(labels.values())


# ---------------------------------------------------------------------------------------------- write

def default_report_path(path: Path) -> Path:
    """``data.jsonl`` -> ``data.rejects.jsonl`` beside it; a folder ``imgs`` -> ``imgs.rejects.jsonl``."""
    path = Path(path)
    if path.is_dir():
        return path.parent / f"{path.name}.rejects.jsonl"
    return path.with_name(f"{path.stem}.rejects.jsonl")


def write_reject_report(rejects: list[dict], dest: Path) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rejects)
    dest.parent.mkdir(parents=True, exist_ok=True)
    images_db.write_atomic(dest, text.encode("utf-8"))
    return dest


def apply_plan(ws: Workspace, plan: ImportPlan) -> ImportResult:
    """Phase 2: publish the staged images, then write all rows in one transaction."""
    result = plan.result
    try:
        plan.stager.publish({row["path"] for row in plan.images})
        counts = prompts_db.write_import(ws.cursor(), plan.images, plan.prompts, plan.candidates, plan.labels)
    except duckdb.Error as err:
        raise PrefloopError(f"importing {result.path} failed while writing to the database, so nothing was "
                            f"imported ({type(err).__name__}: {err})") from err
    finally:
        plan.stager.discard()
    result.images_stored = counts["images"]
    result.new_prompts = counts["prompts"]
    result.candidates = counts["candidates"]
    result.preferences = counts["labels"]
    if counts["candidates"]:
        from storage import review_queue, rounds

        cur = ws.cursor()
        review_queue.refresh_queue(cur, rounds.current_round(cur)["round_id"], ws.config.pairs.judge)
    return result


def import_path(ws: Workspace, path: str | os.PathLike, *, skip_bad: bool = False, allow_outside: bool = False,
                max_megapixels: float = images_db.DEFAULT_MAX_MEGAPIXELS, default_split: str = "train",
                source: str | None = None, progress: bool = True,
                reject_report: str | os.PathLike | None = None) -> ImportResult:
    """Import a JSONL file, a folder with questions.jsonl, a Parquet file or a datasets folder.

    Raises ImportRejected (``.problems`` lists every bad row) when a row is bad and ``skip_bad`` is
    false; nothing is imported then. With ``skip_bad`` the good rows are imported and the bad ones are
    written to ``reject_report`` (default: ``<input>.rejects.jsonl`` beside the input).
    """
    start = time.perf_counter()
    plan = plan_import(ws, path, allow_outside=allow_outside, max_megapixels=max_megapixels,
                       default_split=default_split, source=source, progress=progress)
    result = plan.result
    try:
        if plan.rejects and (skip_bad or reject_report is not None):
            result.reject_report = write_reject_report(
                plan.rejects, Path(reject_report) if reject_report else default_report_path(result.path))
        if plan.rejects and not skip_bad:
            good = result.rows - result.bad_rows
            report = f"; bad rows written to {result.reject_report}" if result.reject_report else ""
            raise ImportRejected(
                f"{result.path}: {result.bad_rows} of {result.rows} rows are bad, nothing was imported{report} "
                f"(fix them, or pass --skip-bad to import the {good} good rows)", problems=result.problems)
        apply_plan(ws, plan)
    finally:
        plan.stager.discard()
    result.seconds = time.perf_counter() - start
    log.info("imported %s: %s", result.path, result.summary())
    return result
