"""Hostile files: a property-based fuzz of the importer over random JSONL rows and random image bytes.

Rows get random keys (the known ones and others), random JSON values of every type, and images that
are valid tiny PNG/JPEG files, truncated files, random garbage, empty files, PNG headers claiming
huge dimensions, folders, missing files, paths outside the import folder, or not paths at all; some
lines are not JSON, not objects, or not UTF-8. Whatever comes in:

- only our own error types escape (``ImportRejected`` and other ``PrefloopError``s), never a crash;
- with ``skip_bad``, no row reported bad is imported, and every row not reported bad is;
- without it, a bad row means nothing at all is imported.

Every string question carries a suffix unique to its line, so "imported" is decidable per row.
"""

from __future__ import annotations

import io
import itertools
import json
import struct
import zlib
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from app.import_sources import ROW_KEYS
from app.importer import import_path
from core.errors import ImportRejected, PrefloopError
from storage import rounds
from storage.workspace import init_workspace

# ---- image bytes ------------------------------------------------------------------------------------


def _encoded(fmt: str, w: int, h: int, rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), rgb).save(buf, format=fmt)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png_header(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h pixels, with a tiny IDAT: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


sizes = st.integers(1, 12)
colours = st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255))
valid_image = st.builds(_encoded, st.sampled_from(["PNG", "JPEG"]), sizes, sizes, colours)
image_bytes = st.one_of(
    valid_image,
    st.builds(lambda data, frac: data[: max(1, int(len(data) * frac))], valid_image, st.floats(0.05, 0.95)),
    st.binary(min_size=0, max_size=200),
    st.builds(huge_png_header, st.integers(10_000, 200_000), st.integers(10_000, 200_000)),
    st.builds(huge_png_header, st.integers(1_000, 3_000), st.integers(1_000, 3_000)),  # under the limit, no data
    st.just(b""),
)

# ---- row values --------------------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=8)

# what an `image` value refers to: ("file", bytes) is written into the import folder under a unique name
image_refs = st.one_of(
    st.tuples(st.just("file"), image_bytes),
    st.tuples(st.just("dict"), image_bytes),          # {"path": "<file>"}
    st.tuples(st.just("missing"), st.none()),
    st.tuples(st.just("folder"), st.none()),
    st.tuples(st.just("outside"), st.none()),          # ../outside.png, a valid image outside the folder
    st.tuples(st.just("value"), json_values),          # not a path at all (or a nonsense one)
)

questions = st.one_of(st.text(max_size=20), st.text(max_size=20), json_values)
field_values = {
    "id": st.one_of(st.text(max_size=8), st.integers(-5, 5), json_values),
    "split": st.one_of(st.sampled_from(["train", "heldout", "test", ""]), json_values),
    "meta": st.one_of(st.dictionaries(st.text(max_size=6), json_values, max_size=3), json_values),
    "reference": st.one_of(st.text(max_size=10), json_values),
    "candidates": st.one_of(st.lists(st.text(max_size=10), max_size=4), json_values),
    "chosen": st.one_of(st.integers(-1, 4), st.text(max_size=6), json_values),
    "rejected": st.one_of(st.integers(-1, 4), st.text(max_size=6), json_values),
}


@st.composite
def good_row(draw) -> dict:
    """A row that should import: a valid image, a question, maybe a split, candidates and a preference."""
    row = {"image": ("file", draw(valid_image)), "question": draw(st.text(min_size=1, max_size=20))}
    if draw(st.booleans()):
        row["split"] = draw(st.sampled_from(["train", "heldout"]))
    if draw(st.booleans()):
        row["candidates"] = draw(st.lists(st.text(min_size=1, max_size=10).filter(str.strip), min_size=2,
                                          max_size=4))
        if draw(st.booleans()):
            row["chosen"], row["rejected"] = 0, len(row["candidates"]) - 1
    return row


@st.composite
def random_row(draw) -> dict:
    """Random keys and values; usually bad, sometimes good by chance."""
    row: dict = {}
    if draw(st.integers(0, 9)) > 0:
        row["image"] = draw(image_refs)
    qkey = draw(st.sampled_from(["question", "question", "prompt", None]))
    if qkey:
        row[qkey] = draw(questions)
    for k in draw(st.lists(st.sampled_from(sorted(field_values)), max_size=4, unique=True)):
        row[k] = draw(field_values[k])
    if draw(st.integers(0, 5)) == 0:
        row[draw(st.text(min_size=1, max_size=6).filter(lambda s: s not in ROW_KEYS))] = draw(json_values)
    return row


@st.composite
def rows(draw):
    """(kind, payload) per line: ("row", dict with an image ref and maybe a question) or ("raw", bytes)."""
    out = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["raw", "good", "good", "good", "broken", "random", "random"]))
        if kind == "raw":
            out.append(("raw", draw(st.sampled_from([b"{not json", b"[1, 2]", b'"a string"', b"\xff\xfe{}",
                                                     b"null", b"{\"image\": \"a.png\", \"question\": "]))))
            continue
        row = draw(good_row()) if kind != "random" else draw(random_row())
        if kind == "broken":  # a good row with one field made random
            k = draw(st.sampled_from(["image", "question", *sorted(field_values)]))
            row[k] = draw(image_refs if k == "image" else questions if k == "question" else field_values[k])
        out.append(("row", row))
    return out


def materialise(folder: Path, lines: list, tag: str) -> tuple[Path, dict[int, str]]:
    """Write the JSONL and its image files; returns (path, line number -> stripped unique question)."""
    folder.mkdir(parents=True)
    outside = folder.parent / "outside.png"
    if not outside.exists():
        outside.write_bytes(_encoded("PNG", 4, 4, (1, 2, 3)))
    (folder / "a_folder.png").mkdir()
    questions_by_line: dict[int, str] = {}
    text = []
    for n, (kind, payload) in enumerate(lines, start=1):
        if kind == "raw":
            text.append(payload)
            continue
        row = dict(payload)
        if "image" in row:
            how, value = row["image"]
            name = f"img{n}.bin"
            if how in ("file", "dict"):
                (folder / name).write_bytes(value)
            row["image"] = {"file": name, "dict": {"path": name}, "missing": "nope/missing.png",
                            "folder": "a_folder.png", "outside": "../outside.png"}.get(how, value)
        for qkey in ("question", "prompt"):
            if isinstance(row.get(qkey), str):
                row[qkey] = f"{row[qkey]} #{tag}-{n}"
                questions_by_line[n] = row[qkey].strip()
        text.append(json.dumps(row).encode())
    path = folder / "rows.jsonl"
    path.write_bytes(b"\n".join(text) + b"\n")
    return path, questions_by_line


def test_hostile_rows_never_crash_and_bad_rows_are_never_imported(tmp_path):
    ws = init_workspace(tmp_path / "ws")
    rounds.ensure_first_round(ws.cursor(), base_model="tiny")
    counter = itertools.count()
    seen = {"imported": 0, "bad": 0, "rejected": 0}

    def imported_questions(source: str) -> set[str]:
        return {r[0] for r in ws.cursor().execute("SELECT question FROM prompts WHERE source = ?", [source]).fetchall()}

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(lines=rows(), skip_bad=st.booleans())
    def check(lines, skip_bad):
        tag = f"e{next(counter)}"
        path, qs = materialise(tmp_path / tag, lines, tag)
        before = ws.cursor().execute("SELECT count(*) FROM prompts").fetchone()[0]
        try:
            result = import_path(ws, path, skip_bad=skip_bad, source=tag, progress=False)
        except ImportRejected as err:
            assert not skip_bad, "skip_bad imports the good rows instead of rejecting"
            assert err.problems
            assert ws.cursor().execute("SELECT count(*) FROM prompts").fetchone()[0] == before, \
                "a rejected import wrote prompts"
            seen["rejected"] += 1
            return
        except PrefloopError:
            assert ws.cursor().execute("SELECT count(*) FROM prompts").fetchone()[0] == before
            return
        bad_lines = set()
        if result.reject_report is not None:
            report = result.reject_report.read_text(encoding="utf-8").split("\n")  # not splitlines(): U+0085
            bad_lines = {json.loads(ln)["line"] for ln in report if ln}
        assert len(bad_lines) == result.bad_rows
        got = imported_questions(tag)
        bad_qs = {q for n, q in qs.items() if n in bad_lines}
        good_qs = {q for n, q in qs.items() if n not in bad_lines}
        assert not got & bad_qs, f"rows reported bad were imported: {got & bad_qs}"
        assert got == good_qs, "a row not reported bad was not imported"
        assert result.new_prompts == len(got)
        assert result.rows == len(lines) and result.bad_rows + len(good_qs) <= len(lines)
        seen["imported"] += len(got)
        seen["bad"] += len(bad_lines)

    check()
    ws.close()
    # the generator reaches both sides: rows imported and rows reported bad
    assert seen["imported"] > 0 and seen["bad"] > 0, seen
