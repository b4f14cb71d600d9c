"""prefloop import: JSONL / folder / Parquet / datasets inputs, dedup, preferences, and every bad row kind."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from app.importer import import_path
from core.errors import ImportRejected, UsageError
from storage import images as images_db
from storage import prompts as prompts_db
from storage import rounds
from storage.workspace import open_workspace
from tests.helpers import make_image, run_cli


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def png_bytes(size=(32, 24), color=(10, 200, 30)) -> bytes:
    img = Image.new("RGB", size, color)
    img.putpixel((3, 4), (255, 0, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def store_files(ws) -> list[Path]:
    return sorted(p for p in ws.lay.images.rglob("*") if p.is_file())


def test_jsonl_relative_paths_content_format_and_listing(workspace, tmp_path):
    d = tmp_path / "in"
    make_image(d / "imgs" / "red.png")
    make_image(d / "imgs" / "really_a_jpeg.png", color=(0, 0, 250), fmt="JPEG")  # extension lies
    f = write_jsonl(d / "data.jsonl", [
        {"image": "imgs/red.png", "question": "  What colour is it?  ", "meta": {"k": 1}, "reference": "red"},
        {"image": "imgs/really_a_jpeg.png", "question": "What colour is it?", "split": "heldout", "id": "blue-1"},
    ])
    res = import_path(workspace, f, progress=False)
    assert (res.rows, res.new_prompts, res.already_present, res.images_stored) == (2, 2, 0, 2)
    assert res.source == "data.jsonl" and res.problems == []

    cur = workspace.cursor()
    blue = prompts_db.get_prompt(cur, "blue-1")
    jpeg_sha = images_db.sha256_hex((d / "imgs" / "really_a_jpeg.png").read_bytes())
    assert blue["image_id"] == jpeg_sha and blue["split"] == "heldout"
    assert blue["image_path"] == f"images/{jpeg_sha[:2]}/{jpeg_sha}.jpg"
    assert (workspace.root / blue["image_path"]).read_bytes() == (d / "imgs" / "really_a_jpeg.png").read_bytes()
    assert images_db.get_image(cur, jpeg_sha)["format"] == "JPEG"

    red_sha = images_db.sha256_hex((d / "imgs" / "red.png").read_bytes())
    red = prompts_db.get_prompt(cur, prompts_db.make_prompt_id(red_sha, "What colour is it?"))
    assert red["question"] == "What colour is it?" and red["meta"] == {"k": 1} and red["reference"] == "red"
    assert red["image_path"].endswith(".png") and (red["width"], red["height"]) == (48, 40)
    assert [p["prompt_id"] for p in prompts_db.list_prompts(cur, split="heldout")] == ["blue-1"]
    assert prompts_db.count_prompts(cur) == 2 and prompts_db.count_prompts(cur, split="train") == 1
    assert len(prompts_db.list_prompts(cur, limit=1)) == 1
    assert len(store_files(workspace)) == 2, "staging folder must be gone after the import"


def test_folder_with_questions_jsonl(workspace, tmp_path):
    d = tmp_path / "shots"
    make_image(d / "a.png")
    make_image(d / "sub" / "b.png", color=(1, 2, 3))
    write_jsonl(d / "questions.jsonl", [{"image": "a.png", "question": "Q a"},
                                        {"image": "sub/b.png", "question": "Q b"}])
    res = import_path(workspace, d, progress=False, default_split="heldout", source="shots-v1")
    assert (res.new_prompts, res.images_stored) == (2, 2)
    rows = prompts_db.list_prompts(workspace.cursor())
    assert {r["question"] for r in rows} == {"Q a", "Q b"}
    assert {r["source"] for r in rows} == {"shots-v1"} and {r["split"] for r in rows} == {"heldout"}


def test_parquet_with_raw_bytes_struct_and_path(workspace, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    make_image(tmp_path / "p" / "on_disk.png", color=(9, 9, 9))
    a, b = png_bytes(color=(1, 1, 1)), png_bytes(color=(2, 2, 2))
    pq.write_table(pa.table({"image": [a, b], "prompt": ["first?", "second?"], "extra": [1, 2]}),
                   tmp_path / "p" / "raw.parquet")
    struct = pa.array([{"bytes": a, "path": "ignored.png"}, {"bytes": None, "path": "on_disk.png"}],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": struct, "question": ["third?", "fourth?"],
                             "prompt": ["<image>USER: third? ASSISTANT:", None],  # ignored: question wins
                             "meta": ['{"from": "json text"}', None]}), tmp_path / "p" / "struct.parquet")

    r1 = import_path(workspace, tmp_path / "p" / "raw.parquet", progress=False)
    assert (r1.new_prompts, r1.images_stored) == (2, 2)
    r2 = import_path(workspace, tmp_path / "p" / "struct.parquet", progress=False)
    assert (r2.new_prompts, r2.images_stored) == (2, 1), "bytes of `a` are already stored"
    cur = workspace.cursor()
    got = {p["question"]: p for p in prompts_db.list_prompts(cur)}
    assert got["first?"]["image_id"] == images_db.sha256_hex(a) == got["third?"]["image_id"]
    assert got["fourth?"]["image_id"] == images_db.sha256_hex((tmp_path / "p" / "on_disk.png").read_bytes())
    assert got["third?"]["meta"] == {"from": "json text"}


def test_datasets_save_to_disk_and_to_parquet(workspace, tmp_path):
    import datasets

    imgs = [Image.new("RGB", (20, 16), (i * 40, 0, 0)) for i in range(3)]
    ds = datasets.Dataset.from_dict({"image": imgs, "question": ["q0", "q1", "q2"]}).cast_column(
        "image", datasets.Image())
    dd = datasets.DatasetDict({"train": ds.select([0, 1]), "test": ds.select([2])})
    dd.save_to_disk(str(tmp_path / "dd"))
    res = import_path(workspace, tmp_path / "dd", progress=False)
    assert (res.rows, res.new_prompts, res.images_stored) == (3, 3, 3)
    cur = workspace.cursor()
    assert [p["question"] for p in prompts_db.list_prompts(cur, split="heldout")] == ["q2"]

    tbl = datasets.Dataset.from_dict({"image": imgs[:1] + [Image.new("RGB", (8, 8))], "prompt": ["q0", "new"]})
    tbl.cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "t.parquet"))
    res2 = import_path(workspace, tmp_path / "t.parquet", progress=False)
    assert (res2.new_prompts, res2.already_present, res2.images_stored) == (1, 1, 1)
    assert prompts_db.count_prompts(cur) == 4


def test_write_is_one_transaction(workspace, tmp_path):
    """A failure in the last insert (a label whose prompt does not exist) leaves no row at all."""
    from app.importer import apply_plan, plan_import
    from core.errors import PrefloopError

    make_image(tmp_path / "a.png")
    f = write_jsonl(tmp_path / "d.jsonl", [{"image": "a.png", "question": "q", "chosen": "yes", "rejected": "no"}])
    before = rounds.table_counts(workspace.cursor())
    plan = plan_import(workspace, f, progress=False)
    assert (len(plan.images), len(plan.prompts), len(plan.candidates), len(plan.labels)) == (1, 1, 2, 1)
    plan.labels.append({**plan.labels[0], "prompt_id": "no-such-prompt"})
    with pytest.raises(PrefloopError, match="nothing was imported"):
        apply_plan(workspace, plan)
    assert rounds.table_counts(workspace.cursor()) == before
    assert import_path(workspace, f, progress=False).new_prompts == 1, "the workspace is still usable"


def test_dedup_same_image_twice_same_prompt_twice_and_reimport(workspace, tmp_path):
    d = tmp_path / "in"
    make_image(d / "x.png")
    (d / "copy_of_x.png").write_bytes((d / "x.png").read_bytes())
    make_image(d / "y.png", color=(0, 99, 0))
    f = write_jsonl(d / "data.jsonl", [
        {"image": "x.png", "question": "Q1"},
        {"image": "copy_of_x.png", "question": "Q2"},
        {"image": "copy_of_x.png", "question": "Q1"},      # same (image, question) as line 1
        {"image": "y.png", "question": "Q1"},
    ])
    res = import_path(workspace, f, progress=False)
    assert (res.new_prompts, res.repeated, res.images_stored) == (3, 1, 2)
    assert len(store_files(workspace)) == 2
    before = rounds.table_counts(workspace.cursor())

    again = import_path(workspace, f, progress=False)
    assert (again.new_prompts, again.already_present, again.images_stored) == (0, 4, 0)
    assert again.summary().startswith("0 new prompts, 4 already present")
    assert rounds.table_counts(workspace.cursor()) == before


def test_candidates_and_preference_become_imported_label(workspace, tmp_path):
    d = tmp_path / "prefs"
    make_image(d / "cat.png")
    f = write_jsonl(d / "prefs.jsonl", [
        {"image": "cat.png", "question": "Describe.", "id": "p1",
         "candidates": ["A red square.", "A cat.", "Nothing."], "chosen": 0, "rejected": 2},
        {"image": "cat.png", "question": "Colour?", "chosen": "Red.", "rejected": "Blue."},
    ])
    res = import_path(workspace, f, progress=False)
    assert (res.new_prompts, res.candidates, res.preferences) == (2, 5, 2)
    cur = workspace.cursor()
    round_id = rounds.current_round(cur)["round_id"]
    cands = prompts_db.list_candidates(cur, round_id=round_id, prompt_id="p1")
    assert [c["text"] for c in cands] == ["A red square.", "A cat.", "Nothing."]
    assert {c["origin"] for c in cands} == {"imported"} and [c["sample_index"] for c in cands] == [0, 1, 2]
    by_text = {c["text"]: c["candidate_id"] for c in prompts_db.list_candidates(cur)}

    labels = prompts_db.list_labels(cur, source="imported")
    assert len(labels) == 2
    p1 = next(lab for lab in labels if lab["prompt_id"] == "p1")
    assert (p1["annotator"], p1["source"], p1["round_id"]) == ("import", "imported", round_id)
    assert (p1["chosen_id"], p1["rejected_id"]) == (by_text["A red square."], by_text["Nothing."])
    other = next(lab for lab in labels if lab["prompt_id"] != "p1")
    assert (other["chosen_id"], other["rejected_id"]) == (by_text["Red."], by_text["Blue."])

    again = import_path(workspace, f, progress=False)
    assert (again.new_prompts, again.candidates, again.preferences) == (0, 0, 0)
    assert len(prompts_db.list_labels(cur)) == 2


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """An 8000x8000 (64 megapixel) 1-bit PNG: 8 KB on disk."""
    buf = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buf, format="PNG")
    return buf.getvalue()


def make_bad_input(root: Path, bomb: bytes) -> tuple[Path, dict[int, str], int]:
    """A JSONL with good rows on lines 1 and 17 and one bad kind on each other line.

    Returns (file, {line: expected message part}, number of good rows)."""
    d = root / "in"
    make_image(d / "good.png")
    make_image(d / "good2.png", color=(5, 5, 250))
    real = (d / "good.png").read_bytes()
    (d / "trunc.png").write_bytes(real[: len(real) // 2])
    corrupt = bytearray(real)
    corrupt[60:80] = b"\x00" * 20
    (d / "corrupt.png").write_bytes(bytes(corrupt))
    (d / "notes.png").write_text("this is a text file, not a picture\n")
    (d / "bomb.png").write_bytes(bomb)
    make_image(root / "outside.png", color=(1, 1, 1))
    os.symlink(root / "outside.png", d / "link.png")
    rows = [
        {"image": "good.png", "question": "ok 1"},                                                    # 1
        {"image": "missing.png", "question": "q"},                                                    # 2
        {"image": "trunc.png", "question": "q"},                                                      # 3
        {"image": "corrupt.png", "question": "q"},                                                    # 4
        {"image": "notes.png", "question": "q"},                                                      # 5
        {"image": "bomb.png", "question": "q"},                                                       # 6
        {"image": "good.png", "question": "   "},                                                     # 7
        '{"image": "good.png", "question": "broken"',                                                 # 8
        {"image": "good.png", "question": 42},                                                        # 9
        {"image": "good.png", "question": "c", "candidates": ["a", 3]},                               # 10
        {"image": "good.png", "question": "c", "candidates": ["a", "b"], "chosen": 2, "rejected": 0},  # 11
        {"image": "good.png", "question": "c", "candidates": ["a", "b"], "chosen": 1, "rejected": 1},  # 12
        {"image": "good.png", "question": "c", "split": "test"},                                      # 13
        {"image": "../outside.png", "question": "q"},                                                 # 14
        {"image": "link.png", "question": "q"},                                                       # 15
        {"image": "good.png", "question": "q", "answer": "typo'd key"},                               # 16
        {"image": "good2.png", "question": "ok 2", "candidates": ["x", "y"], "chosen": 1, "rejected": 0},  # 17
        {"image": "good.png", "question": "dup id", "id": "same"},                                    # 18
        {"image": "good2.png", "question": "dup id 2", "id": "same"},                                 # 19
    ]
    expected = {2: "image not found", 3: "truncated or corrupt", 4: "corrupt", 5: "not an image",
                6: "64.0 megapixels", 7: "empty question", 8: "invalid JSON", 9: "question must be a string",
                10: "candidates must be a list of strings", 11: "chosen index 2 is out of range",
                12: "same candidate", 13: "split must be train or heldout", 14: "outside the import folder",
                15: "symlink", 16: "unknown key 'answer'", 19: "id 'same' is already used by"}
    return write_jsonl(d / "data.jsonl", rows), expected, 3


def test_every_bad_kind_rejects_the_whole_import(workspace, tmp_path, bomb_png):
    f, expected, _ = make_bad_input(tmp_path, bomb_png)
    before = rounds.table_counts(workspace.cursor())
    with pytest.raises(ImportRejected) as e:
        import_path(workspace, f, progress=False)
    problems = e.value.problems
    assert len(problems) == len(expected)
    for problem, (line, part) in zip(problems, sorted(expected.items())):
        assert problem.startswith(f"{f} line {line}: "), problem
        assert part in problem, (part, problem)
    assert "nothing was imported" in str(e.value) and "--skip-bad" in str(e.value)
    assert rounds.table_counts(workspace.cursor()) == before
    assert store_files(workspace) == [], "a rejected import leaves no image files (nor staging folders)"
    assert not list(workspace.lay.images.iterdir())


def test_skip_bad_imports_exactly_the_good_rows_and_reports_the_rest(workspace, tmp_path, bomb_png):
    f, expected, n_good = make_bad_input(tmp_path, bomb_png)
    res = import_path(workspace, f, progress=False, skip_bad=True)
    assert (res.new_prompts, res.candidates, res.preferences, res.bad_rows) == (n_good, 2, 1, len(expected))
    cur = workspace.cursor()
    assert {p["question"] for p in prompts_db.list_prompts(cur)} == {"ok 1", "ok 2", "dup id"}
    assert images_db.count_images(cur) == 2 and len(store_files(workspace)) == 2
    assert res.reject_report == f.with_name("data.rejects.jsonl")
    report = [json.loads(line) for line in res.reject_report.read_text().splitlines()]
    assert [r["line"] for r in report] == sorted(expected)
    assert report[0]["row"] == {"image": "missing.png", "question": "q"}
    assert report[6]["row"] == '{"image": "good.png", "question": "broken"'  # line 8 kept as text
    assert all(expected[r["line"]] in r["error"] for r in report)


def test_megapixel_limit_is_an_option(workspace, tmp_path, bomb_png):
    (tmp_path / "big.png").write_bytes(bomb_png)
    f = write_jsonl(tmp_path / "big.jsonl", [{"image": "big.png", "question": "huge?"}])
    with pytest.raises(ImportRejected) as e:
        import_path(workspace, f, progress=False, max_megapixels=10)
    assert e.value.problems == [(f"{f} line 1: image big.png: image is 8000x8000 = 64.0 megapixels, over the "
                                 f"limit of 10 (a decompression bomb?); raise it with --max-megapixels")]
    res = import_path(workspace, f, progress=False, max_megapixels=65)
    assert res.new_prompts == 1
    assert images_db.get_image(workspace.cursor(), images_db.sha256_hex(bomb_png))["width"] == 8000


def test_outside_paths_allowed_on_request(workspace, tmp_path):
    make_image(tmp_path / "shared" / "s.png")
    f = write_jsonl(tmp_path / "in" / "d.jsonl", [{"image": "../shared/s.png", "question": "q"},
                                                   {"image": str(tmp_path / "shared" / "s.png"), "question": "r"}])
    with pytest.raises(ImportRejected) as e:
        import_path(workspace, f, progress=False)
    assert len(e.value.problems) == 2
    assert import_path(workspace, f, progress=False, allow_outside=True).new_prompts == 2


def test_parquet_bad_rows_name_the_row_index(workspace, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = png_bytes()
    pq.write_table(pa.table({"image": [good, b"GIF89a nope", good], "question": ["fine", "bad image", ""]}),
                   tmp_path / "t.parquet")
    with pytest.raises(ImportRejected) as e:
        import_path(workspace, tmp_path / "t.parquet", progress=False)
    t = tmp_path / "t.parquet"
    assert e.value.problems == [
        f"{t} row 1: image bytes: not an image (PIL cannot identify its content; the file extension does not count)",
        f"{t} row 2: empty question"]
    pq.write_table(pa.table({"picture": [good], "question": ["q"]}), tmp_path / "nocol.parquet")
    with pytest.raises(UsageError, match="has no `image` column"):
        import_path(workspace, tmp_path / "nocol.parquet", progress=False)


def test_id_conflict_with_workspace_and_unknown_input(workspace, tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png", color=(3, 3, 3))
    import_path(workspace, write_jsonl(tmp_path / "one.jsonl", [{"image": "a.png", "question": "q", "id": "k"}]),
                progress=False)
    f2 = write_jsonl(tmp_path / "two.jsonl", [{"image": "b.png", "question": "other", "id": "k"}])
    with pytest.raises(ImportRejected) as e:
        import_path(workspace, f2, progress=False)
    assert e.value.problems == [(f"{f2} line 1: id 'k' already belongs to another prompt in the workspace "
                                 f"(question 'q')")]
    (tmp_path / "x.csv").write_text("image,question\n")
    with pytest.raises(UsageError, match="expected a .jsonl file"):
        import_path(workspace, tmp_path / "x.csv", progress=False)


def test_cli_lists_every_bad_row_then_skip_bad(workspace, tmp_path, bomb_png):
    f, expected, n_good = make_bad_input(tmp_path, bomb_png)
    root = workspace.root
    workspace.close()  # the CLI subprocess must own the database

    r = run_cli("import", "-w", str(root), str(f))
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr
    assert len(lines) == len(expected) + 1
    assert [ln.split(": ", 1)[0] for ln in lines[:-1]] == [f"{f} line {n}" for n in sorted(expected)]
    assert "nothing was imported" in lines[-1]

    report = tmp_path / "rejects.jsonl"
    r = run_cli("import", "-w", str(root), str(f), "--skip-bad", "--reject-report", str(report), "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{n_good} new prompts, 0 already present")
    assert str(report) in r.stderr
    assert len(report.read_text().splitlines()) == len(expected)
    with open_workspace(root) as ws:
        assert prompts_db.count_prompts(ws.cursor()) == n_good
