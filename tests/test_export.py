"""SQL exports (parquet/jsonl/csv), the pair export in TRL's vision format (fed to DPOTrainer), snapshots."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from core.errors import UsageError
from storage import export
from storage.workspace import init_workspace
from tests.helpers import REPO, make_image, run_cli

QUESTIONS = {"p1": 'Is it "red", or blue?', "p2": "Wie viele Äpfel?\nZwei, sagt er", "p3": "plain"}
QUERY = "SELECT prompt_id, question, split, length(question) AS n FROM prompts ORDER BY prompt_id"


def add_image(ws, src_path) -> str:
    """Store an image file content-addressed in the workspace and add its `images` row."""
    data = src_path.read_bytes()
    h = hashlib.sha256(data).hexdigest()
    rel = f"images/{h[:2]}/{h}.png"
    (ws.root / rel).parent.mkdir(parents=True, exist_ok=True)
    (ws.root / rel).write_bytes(data)
    ws.cursor().execute("INSERT INTO images (image_id, path, width, height, format, n_bytes) VALUES (?, ?, 48, 40, "
                        "'PNG', ?)", [h, rel, len(data)])
    return h


@pytest.fixture
def ws(tmp_path):
    w = init_workspace(tmp_path / "ws")
    w.cursor().execute("INSERT INTO rounds (round_id, policy_checkpoint_id, status) VALUES (1, 'c0', 'collecting')")
    yield w
    w.close()


def add_prompts(cur, image_id: str) -> None:
    """The prompts of QUESTIONS on one image (p3 held out)."""
    for pid, q in QUESTIONS.items():
        cur.execute("INSERT INTO prompts (prompt_id, image_id, question, source, split) VALUES "
                    "(?, ?, ?, 'test', ?)", [pid, image_id, q, "heldout" if pid == "p3" else "train"])


@pytest.fixture
def prompts_ws(ws, tmp_path):
    add_prompts(ws.cursor(), add_image(ws, make_image(tmp_path / "a.png")))
    return ws


@pytest.fixture
def prompts_cur(db):
    """The prompts of QUESTIONS in an in-memory database (an image row, no file: SQL exports read none)."""
    db.execute("INSERT INTO images (image_id, path, width, height, format, n_bytes) "
               "VALUES ('img', 'images/im/img.png', 48, 40, 'PNG', 1)")
    add_prompts(db, "img")
    return db


@pytest.fixture
def pairs_ws(ws, tmp_path):
    """Two prompts on two images, two candidates each, one human pair per prompt in round 1."""
    cur = ws.cursor()
    for k, color in enumerate([(200, 30, 30), (30, 30, 200)]):
        image_id = add_image(ws, make_image(tmp_path / f"src{k}.png", color=color))
        cur.execute("INSERT INTO prompts (prompt_id, image_id, question, source, split) VALUES (?, ?, ?, 't', 'train')",
                    [f"p{k}", image_id, f"What color is image {k}?"])
        cur.execute("INSERT INTO candidates (candidate_id, prompt_id, round_id, text, origin) VALUES "
                    "(?, ?, 1, ?, 'policy'), (?, ?, 1, ?, 'policy')",
                    [f"c{k}a", f"p{k}", f"The image is {['red', 'blue'][k]}.", f"c{k}b", f"p{k}", "A horse runs."])
        cur.execute("INSERT INTO pairs (round_id, prompt_id, chosen_id, rejected_id, source, strategy, margin, "
                    "chosen_scores, rejected_scores) VALUES (1, ?, ?, ?, 'human', 'human-only', ?, ?, ?)",
                    [f"p{k}", f"c{k}a", f"c{k}b", 1.5 + k, json.dumps({"overall": 0.9}), json.dumps({"overall": 0.1})])
    return ws


def expected_rows(cur) -> list[dict]:
    rel = cur.execute(QUERY)
    cols = [d[0] for d in rel.description]
    return [dict(zip(cols, r)) for r in rel.fetchall()]


# ---------------------------------------------------------------- SQL exports

def test_parquet_jsonl_csv_round_trip(prompts_cur, tmp_path):
    want = expected_rows(prompts_cur)
    assert len(want) == 3
    cur = prompts_cur
    assert export.export_query(cur, QUERY, tmp_path / "q.parquet", "parquet") == 3
    assert pq.read_table(tmp_path / "q.parquet").to_pylist() == want
    assert export.export_query(cur, QUERY, tmp_path / "q.jsonl", "jsonl") == 3
    lines = (tmp_path / "q.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == want
    assert export.export_query(cur, QUERY, tmp_path / "q.csv", "csv") == 3
    with open(tmp_path / "q.csv", newline="", encoding="utf-8") as f:
        got = list(csv.DictReader(f))
    assert got == [{k: str(v) for k, v in r.items()} for r in want]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == [], "no temp files left"


def test_limit_and_run_query(prompts_cur, tmp_path):
    cur = prompts_cur
    assert export.export_query(cur, QUERY + " -- a trailing comment", tmp_path / "l.parquet", "parquet",
                               limit=2) == 2
    assert pq.read_table(tmp_path / "l.parquet").column("prompt_id").to_pylist() == ["p1", "p2"]
    table = export.run_query(cur, QUERY, limit=1)
    assert table.num_rows == 1 and table.column("question").to_pylist() == [QUESTIONS["p1"]]
    assert export.run_query(cur, QUERY, limit=0).num_rows == 0
    with pytest.raises(UsageError, match="--limit"):
        export.run_query(cur, QUERY, limit=-1)
    with pytest.raises(UsageError, match="unknown export format 'xlsx'"):
        export.export_query(cur, QUERY, tmp_path / "x.xlsx", "xlsx")


def test_failed_query_leaves_no_file_and_says_why(prompts_cur, tmp_path):
    with pytest.raises(UsageError, match="the query failed: .*no_such_column"):
        export.export_query(prompts_cur, "SELECT no_such_column FROM prompts", tmp_path / "f.csv", "csv")
    assert list(tmp_path.glob("*f.csv*")) == []


def test_cli_sql_export_and_refusal(prompts_ws, tmp_path):
    root = str(prompts_ws.root)
    prompts_ws.close()
    out = tmp_path / "cli.jsonl"
    r = run_cli("export", "-w", root, "--sql", QUERY, "--out", str(out), "--limit", "2")
    assert r.returncode == 0, r.stderr
    assert "wrote 2 rows" in r.stdout and "(jsonl)" in r.stdout and "rows/s" in r.stdout
    assert [json.loads(x)["prompt_id"] for x in out.read_text().splitlines()] == ["p1", "p2"]
    r = run_cli("export", "-w", root, "--sql", "SELECT * FROM read_csv('/etc/passwd')", "--out",
                str(tmp_path / "bad.csv"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "read_csv() (reads files)" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "bad.csv").exists()
    r = run_cli("export", "-w", root, "--sql", "DELETE FROM prompts", "--out", str(tmp_path / "d.csv"))
    assert r.returncode == 2 and "DELETE statement" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------- pair export

def test_pair_export_trains_one_dpo_step(pairs_ws, tmp_path, tiny_model_dir):
    import datasets
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from backend.models import load_model, load_processor

    out = tmp_path / "pairs.parquet"
    assert export.export_pairs(pairs_ws.cursor(), pairs_ws.root, out) == 2
    ds = datasets.load_dataset("parquet", data_files=str(out), split="train")
    assert ds.column_names == [f.name for f in export.PAIR_SCHEMA]
    assert isinstance(ds.features["images"].feature, datasets.Image), "images decode to PIL with no cast"
    row = ds[0]
    assert row["images"][0].size == (48, 40)
    assert row["images"][0].getpixel((20, 30)) == (200, 30, 30)
    assert row["prompt"] == [{"role": "user", "content": [{"type": "image", "text": None},
                                                          {"type": "text", "text": "What color is image 0?"}]}]
    assert row["chosen"] == [{"role": "assistant", "content": [{"type": "text", "text": "The image is red."}]}]
    assert row["rejected"] == [{"role": "assistant", "content": [{"type": "text", "text": "A horse runs."}]}]
    assert (row["round_id"], row["prompt_id"], row["source"], row["margin"]) == (1, "p0", "human", 1.5)
    assert json.loads(row["chosen_scores"]) == {"overall": 0.9} and json.loads(row["rejected_scores"]) == {
        "overall": 0.1}
    raw = pq.read_table(out).column("images").to_pylist()[1]
    assert raw == [{"bytes": None, "path": str(pairs_ws.root / pairs_ws.cursor().execute(
        "SELECT i.path FROM images i JOIN prompts p USING (image_id) WHERE prompt_id = 'p1'").fetchone()[0])}]

    args = DPOConfig(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=2, max_steps=1, report_to=[],
                     gradient_checkpointing=False, bf16=False, use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = DPOTrainer(model=load_model(tiny_model_dir), args=args, train_dataset=ds,
                         processing_class=load_processor(tiny_model_dir),
                         peft_config=LoraConfig(r=4, lora_alpha=8,
                                                target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    result = trainer.train()
    assert result.global_step == 1
    logged = trainer.state.log_history[0]
    assert math.isfinite(logged["loss"]) and logged["loss"] > 0
    assert math.isfinite(logged["logps/chosen"]) and logged["logps/chosen"] < 0


def test_pair_export_jsonl_llava_and_embedded(pairs_ws, tmp_path):
    import datasets

    cur, root = pairs_ws.cursor(), pairs_ws.root
    assert export.export_pairs(cur, root, tmp_path / "p.jsonl", "jsonl", round_id=1) == 2
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["prompt_id"] for r in rows] == ["p0", "p1"]
    assert rows[1]["images"][0].startswith(str(root)) and rows[1]["chosen"][0]["content"][0]["text"] == \
        "The image is blue."
    ds = datasets.load_dataset("json", data_files=str(tmp_path / "p.jsonl"), split="train")
    ds = ds.cast_column("images", datasets.List(datasets.Image()))  # the documented one-line cast for JSONL
    assert ds[1]["images"][0].getpixel((20, 30)) == (30, 30, 200)

    assert export.export_pairs(cur, root, tmp_path / "p.json", "llava") == 2
    llava = json.loads((tmp_path / "p.json").read_text())
    assert llava[0]["id"] == "r1:p0:c0a:c0b"
    assert llava[0]["conversations"] == [{"from": "human", "value": "<image>\nWhat color is image 0?"}]
    assert llava[0]["chosen"] == {"from": "gpt", "value": "The image is red."}
    assert llava[0]["rejected"] == {"from": "gpt", "value": "A horse runs."}

    export.export_pairs(cur, root, tmp_path / "e.parquet", embed_images=True)
    (tmp_path / "src0.png").unlink()
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "e.parquet"), split="train")
    assert ds[0]["images"][0].getpixel((20, 30)) == (200, 30, 30), "bytes travel inside the file"
    with pytest.raises(UsageError, match="round 7 does not exist"):
        export.export_pairs(cur, root, tmp_path / "x.parquet", round_id=7)


def test_pair_export_rows_are_core_trl_format(pairs_ws, tmp_path):
    """DuckDB spells the rows in SQL: every format equals core.trl_format's rows, tricky text included."""
    from core.trl_format import llava_row, trl_row

    cur, root = pairs_ws.cursor(), pairs_ws.root.resolve()
    tricky = 'Quote " back\\slash\nnewline,\ttab, Äpfel 🍎, a\u2028separator, \x01'
    image_id = cur.execute("SELECT image_id FROM prompts WHERE prompt_id = 'p0'").fetchall()[0][0]
    cur.execute("INSERT INTO prompts (prompt_id, image_id, question, source, split) VALUES ('p2', ?, ?, 't', 'train')",
                [image_id, tricky])
    cur.execute("INSERT INTO candidates (candidate_id, prompt_id, round_id, text, origin) VALUES "
                "('c2a', 'p2', 1, ?, 'policy'), ('c2b', 'p2', 1, ?, 'policy')", [tricky[::-1], "  " + tricky])
    cur.execute("INSERT INTO pairs (round_id, prompt_id, chosen_id, rejected_id, source, strategy) "
                "VALUES (1, 'p2', 'c2b', 'c2a', 'gemini', 'best-worst')")
    rows = export.pair_rows(cur)
    provenance = [{k: r[k] for k, _ in export.PROVENANCE_FIELDS} for r in rows]
    images = [str(root / r["image_path"]) for r in rows]

    export.export_pairs(cur, root, tmp_path / "p.parquet")
    want = [{**trl_row({"bytes": None, "path": im}, r["question"], r["chosen_text"], r["rejected_text"]), **pv}
            for im, r, pv in zip(images, rows, provenance)]
    assert pq.read_table(tmp_path / "p.parquet").to_pylist() == want
    export.export_pairs(cur, root, tmp_path / "p.jsonl", "jsonl")
    lines = (tmp_path / "p.jsonl").read_text(encoding="utf-8").split("\n")  # not splitlines(): U+2028
    got = [json.loads(line) for line in lines if line]
    assert got == [{**trl_row(im, r["question"], r["chosen_text"], r["rejected_text"]), **pv}
                   for im, r, pv in zip(images, rows, provenance)]
    export.export_pairs(cur, root, tmp_path / "p.json", "llava")
    assert json.loads((tmp_path / "p.json").read_text(encoding="utf-8")) == [
        llava_row(f"r{r['round_id']}:{r['prompt_id']}:{r['chosen_id']}:{r['rejected_id']}", im, r["question"],
                  r["chosen_text"], r["rejected_text"]) for im, r in zip(images, rows)]
    export.export_pairs(cur, root, tmp_path / "e.parquet", embed_images=True)
    embedded = pq.read_table(tmp_path / "e.parquet").column("images").to_pylist()
    assert embedded == [[{"bytes": (root / r["image_path"]).read_bytes(), "path": (root / r["image_path"]).name}]
                        for r in rows]


def test_empty_pair_export_has_columns(db, tmp_path):
    import datasets

    assert export.export_pairs(db, tmp_path, tmp_path / "e.parquet") == 0
    table = pq.read_table(tmp_path / "e.parquet")
    assert table.num_rows == 0 and table.schema.names == export.PAIR_SCHEMA.names
    # datasets.load_dataset refuses any 0-row file ("corresponds to no data"); the schema is still there.
    features = datasets.Features.from_dict(json.loads(table.schema.metadata[b"huggingface"])["info"]["features"])
    assert isinstance(features["images"].feature, datasets.Image) and list(features) == table.schema.names
    assert export.export_pairs(db, tmp_path, tmp_path / "e.jsonl", "jsonl") == 0
    assert (tmp_path / "e.jsonl").read_text() == ""
    assert export.export_pairs(db, tmp_path, tmp_path / "e.json", "llava") == 0
    assert json.loads((tmp_path / "e.json").read_text()) == []


def test_cli_pairs_export(pairs_ws, tmp_path):
    root = str(pairs_ws.root)
    pairs_ws.close()
    r = run_cli("export", "-w", root, "--pairs", "--round", "1", "--out", str(tmp_path / "cli.json"))
    assert r.returncode == 0, r.stderr
    assert "wrote 2 pairs" in r.stdout and "(llava)" in r.stdout
    assert len(json.loads((tmp_path / "cli.json").read_text())) == 2
    r = run_cli("export", "-w", root, "--pairs", "--format", "csv", "--out", str(tmp_path / "x.csv"))
    assert r.returncode == 2 and "not available with --pairs" in r.stderr


# ---------------------------------------------------------------- snapshot

def test_snapshot_readable_by_another_process_while_owner_runs(pairs_ws, tmp_path):
    cur = pairs_ws.cursor()
    counts = {t: cur.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
              for t in ("images", "prompts", "candidates", "pairs", "rounds", "schema_migrations")}
    out = export.snapshot(cur, tmp_path / "snap.duckdb")
    cur.execute("DELETE FROM pairs")  # the owner keeps working; the snapshot does not change
    code = ("import duckdb, json, sys\n"
            "con = duckdb.connect(sys.argv[1], read_only=True)\n"
            f"print(json.dumps({{t: con.execute(f'SELECT count(*) FROM {{t}}').fetchone()[0] for t in {list(counts)}}}))")
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=60, cwd=REPO,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == counts and counts["pairs"] == 2
    with pytest.raises(UsageError, match="already exists; pass --force"):
        export.snapshot(cur, out)
    export.snapshot(cur, out, force=True)
    with pytest.raises(UsageError, match="workspace database itself"):
        export.snapshot(cur, pairs_ws.lay.db, force=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".wal"))] == []


def test_cli_snapshot_refuses_overwrite(ws, tmp_path):
    root = str(ws.root)
    ws.close()
    out = tmp_path / "s.duckdb"
    r = run_cli("snapshot", "-w", root, str(out))
    assert r.returncode == 0 and out.is_file() and "wrote snapshot" in r.stdout, r.stderr
    r = run_cli("snapshot", "-w", root, str(out))
    assert r.returncode == 2 and "already exists; pass --force" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("snapshot", "-w", root, str(out), "--force")
    assert r.returncode == 0, r.stderr
