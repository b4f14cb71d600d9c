"""The demo workspace: real photos with questions, and the builder on `tiny` (same code path as `demo`)."""

from __future__ import annotations

import json

import duckdb
from PIL import Image

from app.cli import main as cli_main
from app.demo_content import PHOTOS, write_demo_import


def test_demo_content_real_photos_and_questions(tmp_path):
    out = write_demo_import(tmp_path / "d")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    photos = {r["image"] for r in rows if r["meta"]["source"].startswith("skimage:")}
    assert len(photos) >= 20 == len(PHOTOS)
    sizes = {Image.open(tmp_path / "d" / p).size for p in photos}
    assert len(sizes) >= 10, "distinct real photos, not one image repeated"
    assert all(r["question"].strip() for r in rows)
    vqa = [r for r in rows if r["meta"]["source"] == "easy-vqa"]
    assert len(vqa) >= 6 and all(r["reference"] for r in vqa)
    assert any(r["split"] == "heldout" for r in vqa)
    lic = (tmp_path / "d" / "LICENSES.md").read_text()
    assert all(f"images/{name}.png" in lic for name in PHOTOS)
    assert out.read_text() == write_demo_import(tmp_path / "d").read_text(), "deterministic"


def test_demo_builder_on_tiny(tmp_path, capsys):
    ws = tmp_path / "demo-ws"
    assert cli_main(["demo", str(ws), "--model", "tiny", "--no-serve", "--quiet", "--prompts", "8", "--k", "2",
                     "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "admin user: admin   password: " in out
    con = duckdb.connect(str(ws / "prefloop.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM prompts").fetchone()[0] == 8
        assert con.execute("SELECT count(*) FROM candidates WHERE origin = 'policy'").fetchone()[0] == 2 * 8
        assert con.execute("SELECT role FROM users").fetchall() == [("admin",)]
    finally:
        con.close()
    # a second run only starts the studio (here: --no-serve) and prints no new password
    assert cli_main(["demo", str(ws), "--model", "tiny", "--no-serve", "--quiet"]) == 0
    again = capsys.readouterr().out
    assert "is ready" in again and "admin user: admin   password:" not in again
