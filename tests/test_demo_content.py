"""The demo content: real scikit-image photos with questions, easy-vqa prompts with references, importable."""

from __future__ import annotations

import hashlib
import json

import pytest
from PIL import Image

from app.demo_content import IMAGES, PHOTOS, _heldout, write_demo_import
from app.importer import import_path
from core.errors import UsageError


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    dest = tmp_path_factory.mktemp("demo-data")
    return dest, write_demo_import(dest)


def _rows(jsonl):
    return [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]


def test_at_least_20_distinct_real_photos(demo_dir):
    dest, jsonl = demo_dir
    rows = _rows(jsonl)
    photos = {r["image"] for r in rows if r["meta"]["kind"] == "photo"}
    assert photos == {f"images/{name}.png" for name in PHOTOS}
    pixels = set()
    for rel in photos:
        img = Image.open(dest / rel)
        assert img.format == "PNG" and img.mode == "RGB" and min(img.size) >= 100, rel
        pixels.add(hashlib.sha256(img.tobytes()).hexdigest())
    assert len(pixels) >= 20, "20 different pictures, not one repeated"
    assert all(r["meta"]["source"].startswith("skimage:") for r in rows if r["meta"]["kind"] != "synthetic")


def test_questions_ids_and_licences(demo_dir):
    dest, jsonl = demo_dir
    rows = _rows(jsonl)
    assert all(isinstance(r["question"], str) and len(r["question"].split()) >= 3 for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({(r["image"], r["question"]) for r in rows}) == len(rows)
    per_image = {}
    for r in rows:
        per_image.setdefault(r["image"], []).append(r)
    assert all(1 <= len(v) <= 3 for v in per_image.values())
    assert any("How many" in r["question"] for r in rows), "a counting question"
    licences = (dest / "LICENSES.md").read_text(encoding="utf-8")
    for rel in per_image:
        assert f"`{rel}`" in licences, rel
    assert all(r["meta"]["license"] for r in rows)


def test_easy_vqa_rows_have_references_and_some_are_held_out(demo_dir):
    _, jsonl = demo_dir
    vqa = [r for r in _rows(jsonl) if r["meta"]["source"] == "easy-vqa"]
    assert len(vqa) == 8
    import easy_vqa

    answers = set(easy_vqa.get_answers())
    assert all(r["reference"] in answers for r in vqa)
    assert len({r["image"] for r in vqa}) == 8
    held = [r for r in vqa if r["split"] == "heldout"]
    assert len(held) == 2  # 20 % of 8, rounded
    assert {r["split"] for r in _rows(jsonl) if r["meta"]["source"] != "easy-vqa"} == {"train"}


def test_deterministic_and_parameters(tmp_path, demo_dir):
    _, jsonl = demo_dir
    again = write_demo_import(tmp_path / "again", n_easy_vqa=8, heldout_fraction=0.2)
    assert again.read_bytes() == jsonl.read_bytes()
    assert (tmp_path / "again" / "images" / "coins.png").read_bytes() == \
        (jsonl.parent / "images" / "coins.png").read_bytes()
    none = _rows(write_demo_import(tmp_path / "none", n_easy_vqa=0))
    assert not [r for r in none if r["meta"]["source"] == "easy-vqa"]
    assert _heldout(6, 0.5) == {0, 2, 4} and _heldout(8, 0.2) == {0, 4} and _heldout(3, 0.01) == {0}
    assert _heldout(8, 0.0) == set() and _heldout(0, 0.2) == set()
    with pytest.raises(UsageError, match="heldout_fraction"):
        write_demo_import(tmp_path / "bad", heldout_fraction=1.5)


def test_imports_cleanly_into_a_fresh_workspace(workspace, demo_dir):
    _, jsonl = demo_dir
    rows = _rows(jsonl)
    result = import_path(workspace, jsonl, progress=False, source="demo")
    assert result.bad_rows == 0
    assert result.new_prompts == len(rows)
    assert result.images_stored == len(IMAGES) + 8
    cur = workspace.cursor()
    split = dict(cur.execute("SELECT split, count(*) FROM prompts GROUP BY split").fetchall())
    assert split == {"train": len(rows) - 2, "heldout": 2}
    refs = cur.execute("SELECT count(*) FROM prompts WHERE reference IS NOT NULL").fetchone()[0]
    assert refs == sum("reference" in r for r in rows)
    again = import_path(workspace, jsonl, progress=False, source="demo")
    assert again.new_prompts == 0 and again.already_present == len(rows)
