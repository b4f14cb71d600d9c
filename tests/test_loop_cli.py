"""The loop on the command line, as a user runs it: init -> import -> generate -> pairs -> train -> train."""

from __future__ import annotations

import json

import duckdb
import pytest
from safetensors.torch import load_file

from tests.helpers import make_image, run_cli


@pytest.fixture(scope="module")
def trained_ws(tmp_path_factory):
    """A tiny workspace taken through two full CLI rounds (shared by the tests below)."""
    root = tmp_path_factory.mktemp("loop")
    data = root / "data"
    rows = []
    for i in range(6):
        make_image(data / f"img{i}.png", size=(40 + i, 36), color=(40 * i % 255, 90, 200 - 20 * i))
        rows.append({"image": f"img{i}.png", "question": f"What colour is shape {i}?"})
    rows.append({"image": "img0.png", "question": "Held out?", "split": "heldout"})
    (data / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ws = root / "ws"
    log = {}
    steps = [
        ("init", ["init", str(ws), "--model", "tiny"]),
        ("import", ["import", "-w", str(ws), str(data / "q.jsonl")]),
        ("generate1", ["generate", "-w", str(ws), "--k", "2", "--max-new-tokens", "8", "--views", "original,aug:hflip"]),
        ("pairs1", ["pairs", "-w", str(ws), "--strategy", "seva"]),
        ("train1", ["train", "-w", str(ws)]),
        ("generate2", ["generate", "-w", str(ws), "--k", "2", "--max-new-tokens", "8", "--views", "original,aug:diffusion:800"]),
        ("pairs2", ["pairs", "-w", str(ws), "--strategy", "seva"]),
        ("train2", ["train", "-w", str(ws)]),
    ]
    for name, argv in steps:
        r = run_cli(*argv)
        log[name] = r
        assert r.returncode == 0, f"{name}: {r.stdout}\n{r.stderr[-3000:]}"
    return ws, log


def _q(ws, sql):
    con = duckdb.connect(str(ws / "prefloop.duckdb"), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_pairs_formed_and_printed(trained_ws):
    ws, log = trained_ws
    assert "pairs (seva" in log["pairs1"].stdout
    n = int(log["pairs1"].stdout.split(":")[1].split()[0])
    assert n > 0, log["pairs1"].stdout
    assert _q(ws, "SELECT count(*) FROM pairs WHERE round_id = 1")[0][0] == n


def test_candidates_provenance(trained_ws):
    ws, _ = trained_ws
    rows = _q(ws, "SELECT origin, view, count(*), count(DISTINCT prompt_id) FROM candidates WHERE round_id = 1 "
                  "GROUP BY ALL ORDER BY origin")
    assert rows == [("policy", "original", 12, 6), ("seva_augmented", "aug:hflip", 6, 6)]
    (sampling, model, engine, ckpt), = _q(ws, "SELECT DISTINCT sampling::VARCHAR, model, engine, checkpoint_id "
                                              "FROM candidates WHERE round_id = 1 AND origin = 'policy'")
    assert (model, engine, ckpt) == ("tiny", "hf", "c0")
    assert json.loads(sampling)["temperature"] == 0.7


def test_lineage_rows(trained_ws):
    ws, _ = trained_ws
    ck = _q(ws, "SELECT checkpoint_id, round_id, parent_id, kind FROM checkpoints ORDER BY checkpoint_id")
    assert ck == [("c0", None, None, "base"), ("c1", 1, "c0", "merged"), ("c2", 2, "c1", "merged")]
    rounds = _q(ws, "SELECT round_id, policy_checkpoint_id, status FROM rounds ORDER BY round_id")
    assert rounds == [(1, "c0", "trained"), (2, "c1", "trained"), (3, "c2", "collecting")]
    # round 2 was generated from round 1's checkpoint
    assert _q(ws, "SELECT DISTINCT checkpoint_id FROM candidates WHERE round_id = 2") == [("c1",)]
    assert _q(ws, "SELECT count(*) FROM pairs WHERE frozen_at IS NULL")[0][0] == 0
    m = _q(ws, "SELECT round_id, count(*), bool_and(isfinite(loss)) FROM train_metrics GROUP BY 1 ORDER BY 1")
    assert [r[0] for r in m] == [1, 2] and all(r[1] > 0 and r[2] for r in m)
    meta = json.loads((ws / "checkpoints" / "r002" / "meta.json").read_text())
    assert meta["parent_id"] == "c1" if "parent_id" in meta else meta["parent"] == "c1"


def test_checkpoint_weights_differ_from_base(trained_ws):
    ws, _ = trained_ws
    base = load_file(str(next((ws / "checkpoints" / "c0").glob("*.safetensors"))))
    new = load_file(str(next((ws / "checkpoints" / "r001").glob("*.safetensors"))))
    changed = [k for k in base if k in new and base[k].shape == new[k].shape and not base[k].equal(new[k])]
    assert changed, "training changed no weight"
    assert any("language_model" in k for k in changed)
