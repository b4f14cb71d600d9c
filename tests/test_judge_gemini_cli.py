"""`prefloop judge --judge gemini` end to end: the real SDK against the fake server, rows stored once."""

from __future__ import annotations

import json

import duckdb

from app.cli import main as cli_main
from core import config as cfgmod
from tests.fakes.gemini_server import FakeGemini
from tests.helpers import make_image

KEY = "fake-KEY-never-stored-9f3a"


def test_gemini_judge_through_cli(tmp_path, monkeypatch):
    data = tmp_path / "data"
    rows = []
    for i in range(3):
        make_image(data / f"i{i}.png", color=(30 * i, 200, 90))
        rows.append({"image": f"i{i}.png", "question": f"What is in picture {i}?",
                     "candidates": [f"A short answer {i}.", f"A much longer and more helpful answer {i}."]})
    (data / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ws = tmp_path / "ws"
    assert cli_main(["init", str(ws)]) == 0
    assert cli_main(["import", "-w", str(ws), str(data / "q.jsonl")]) == 0
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    with FakeGemini(api_key=KEY) as fake:
        cfg = cfgmod.update(cfgmod.load(ws / "prefloop.toml"), {"judges.gemini.base_url": fake.url,
                                                                "judges.gemini.backoff_s": 0.05})
        cfgmod.save(cfg, ws / "prefloop.toml")
        assert cli_main(["judge", "-w", str(ws), "--judge", "gemini", "--quiet"]) == 0
        sent = len(fake.requests)
        assert sent == 3
        assert cli_main(["judge", "-w", str(ws), "--judge", "gemini", "--quiet"]) == 0
        assert len(fake.requests) == sent, "a second run pays for nothing already judged"
    con = duckdb.connect(str(ws / "prefloop.duckdb"), read_only=True)
    got = con.execute("SELECT status, count(*), min(helpfulness) >= 0, max(helpfulness) <= 4, "
                      "bool_and(overall BETWEEN 0 AND 1) FROM judgments WHERE judge = 'gemini' GROUP BY 1").fetchall()
    con.close()
    assert got == [("ok", 6, True, True, True)]
    for f in ws.rglob("*"):
        if f.is_file():
            assert KEY.encode() not in f.read_bytes(), f"API key written to {f}"
