"""The admin tabs (Rounds, Data, Export): handlers called directly and through the running app with
gradio_client — role refusals on every admin endpoint, SQL preview and the guard's refusals, file
exports, uploads, judge runs and counts, round start / busy / cancel, per-round results."""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from gradio_client import Client, handle_file

from app.server import AppContext, data_tab, export_tab, rounds_tab
from app.server import review as rv
from app.server.app import launch
from app.server.runner import studio_of
from core.errors import AuthError, UnsafeQuery, UsageError
from storage import audit, rounds, sqlguard
from storage import pairs as pairs_db
from storage import prompts as prompts_db
from storage.studio import EXAMPLE_QUERIES
from tests.helpers import build_workspace, free_port, make_image, wait_until

ADMIN_MODULES = {"app.server.rounds_tab", "app.server.data_tab", "app.server.export_tab"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ws = build_workspace(tmp_path_factory.mktemp("admin") / "ws")
    ctx = AppContext(ws)
    demo, url = launch(ctx, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url, ctx, demo
    demo.close()
    studio_of(ctx).runner.wait(120)
    ws.close()


@pytest.fixture
def ctx(tmp_path):
    ws = build_workspace(tmp_path / "ws")
    c = AppContext(ws)
    yield c
    studio_of(c).runner.wait(120)
    ws.close()


def client(url: str, name: str) -> Client:
    return Client(url, auth=(name, f"{name}-password"), verbose=False)


def parquet_upload(path: Path, n: int = 2, prefix: str = "uploaded") -> Path:
    rows = []
    for i in range(n):
        img = make_image(path.parent / f"src{i}.png", size=(30 + i, 20), color=(10 * i, 100, 50))
        rows.append({"image": img.read_bytes(), "question": f"{prefix} question {i}?"})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def zip_upload(path: Path, questions: list[dict], images: dict[str, bytes], extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("batch/questions.jsonl", "\n".join(json.dumps(q) for q in questions) + "\n")
        for name, data in images.items():
            zf.writestr(f"batch/{name}", data)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


def audit_rows(ctx: AppContext, action: str) -> list[dict]:
    return audit.recent(ctx.ws.cursor(), 500, action=action)


# ---------------------------------------------------------------------------------------------- roles

# Every admin endpoint with arguments that would do something for an admin.
ADMIN_CALLS = {
    "rounds_status": (None,), "start_round": (), "cancel_round": (), "round_details": (None,),
    "round_details_pick": (1,), "data_status": (), "run_judge": ("reference", None), "data_counts": (),
    "snapshot": (), "example_query": ("judge disagreement",), "export_preview": ("SELECT 1 AS x", 5),
    "export_query": ("SELECT 1 AS x", "csv"), "export_pairs": ("all rounds", "parquet"), "pair_rounds": (),
    "import_upload": ("UPLOAD", "train", "", False),
}


def test_every_admin_endpoint_is_listed(server):
    _, _, demo = server
    mine = {f.api_name for f in demo.fns.values()
            if f.fn is not None and f.fn.__module__ in ADMIN_MODULES and f.api_visibility != "private"}
    assert mine == set(ADMIN_CALLS)


def test_annotator_refused_on_every_admin_endpoint(server, tmp_path):
    url, ctx, _ = server
    bob = client(url, "bob")
    upload = parquet_upload(tmp_path / "sneaky.parquet", prefix="sneaky")
    before = prompts_db.count_prompts(ctx.ws.cursor())
    for name, args in ADMIN_CALLS.items():
        args = tuple(handle_file(str(upload)) if a == "UPLOAD" else a for a in args)
        with pytest.raises(Exception, match="bob is an annotator: .* needs the admin role"):
            bob.predict(*args, api_name=f"/{name}")
    assert prompts_db.count_prompts(ctx.ws.cursor()) == before
    assert studio_of(ctx).runner.snapshot() is None, "no round or judge was started"
    refused = [json.loads(r["detail"]) for r in audit_rows(ctx, "refused") if r["actor"] == "bob"]
    assert len(refused) >= len(ADMIN_CALLS)
    assert not [r for r in audit_rows(ctx, "export") + audit_rows(ctx, "round.start") if r["actor"] == "bob"]


def test_handlers_refuse_annotators_and_anonymous(ctx):
    calls = [lambda u: rounds_tab.status(ctx, u), lambda u: rounds_tab.start(ctx, u),
             lambda u: rounds_tab.cancel(ctx, u), lambda u: rounds_tab.details(ctx, u),
             lambda u: data_tab.counts(ctx, u), lambda u: data_tab.make_snapshot(ctx, u),
             lambda u: data_tab.run_judge(ctx, u, "reference"), lambda u: data_tab.import_upload(ctx, u, "x.jsonl"),
             lambda u: data_tab.runner_status(ctx, u), lambda u: export_tab.preview(ctx, u, "SELECT 1"),
             lambda u: export_tab.export_sql(ctx, u, "SELECT 1"), lambda u: export_tab.export_pair_file(ctx, u),
             lambda u: export_tab.example(ctx, u, "judge disagreement"), lambda u: export_tab.round_choices(ctx, u)]
    for call in calls:
        with pytest.raises(AuthError, match="needs the admin role"):
            call("ann")
        with pytest.raises(AuthError, match="not logged in"):
            call(None)
    assert not rounds_tab.is_admin(ctx, "ann") and rounds_tab.is_admin(ctx, "boss")
    assert studio_of(ctx).runner.snapshot() is None


# ---------------------------------------------------------------------------------------------- export

def test_admin_previews_a_query(server):
    url, ctx, _ = server
    boss = client(url, "boss")
    table, summary = boss.predict("SELECT prompt_id, split FROM prompts ORDER BY prompt_id", 3,
                                  api_name="/export_preview")
    assert table["headers"] == ["prompt_id", "split"]
    assert table["data"] == [["p0", "train"], ["p1", "train"], ["p2", "train"]]
    assert summary.startswith("3 rows (the limit")
    rec = audit_rows(ctx, "query")[0]
    assert rec["actor"] == "boss" and "SELECT prompt_id" in json.loads(rec["detail"])["sql"]
    with pytest.raises(Exception, match="greater than maximum value 10000"):
        boss.predict("SELECT 1", 10_001, api_name="/export_preview")
    with pytest.raises(UsageError, match="1 to 10000 rows"):  # the handler's own bound, without Gradio's
        export_tab.preview(ctx, "boss", "SELECT 1", 10_001)


@pytest.mark.parametrize("sql", [
    "DELETE FROM prompts",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT 1; DROP TABLE users",
    "COPY prompts TO '/tmp/x.csv'",
    "SELECT * FROM '/etc/passwd'",
    "ATTACH '/tmp/other.duckdb' AS other",
])
def test_refused_sql_shows_the_guards_message(server, sql):
    url, ctx, _ = server
    cur = ctx.ws.cursor()
    try:
        sqlguard.check_select(cur, sql)
    except (UnsafeQuery, UsageError) as err:
        expected = str(err)
    else:
        pytest.fail(f"the guard let {sql!r} through")
    boss = client(url, "boss")
    for api, args in (("/export_preview", (sql, 10)), ("/export_query", (sql, "parquet"))):
        with pytest.raises(Exception) as info:
            boss.predict(*args, api_name=api)
        assert expected in str(info.value), (api, str(info.value))
    refused = json.loads(audit_rows(ctx, "query_refused")[0]["detail"])
    assert refused["sql"] == sql and refused["error"] == expected[:500]
    assert pairs_db.count(cur) >= 0 and cur.execute("SELECT count(*) FROM prompts").fetchone()[0] >= 5


def test_example_queries_run_and_mean_what_they_say(ctx):
    # ann prefers answer 3 on p2, where both judges' best is another answer: an override of the AI
    state = rv.next_item(ctx, "ann", None).state
    shown = state.item.prompt_id
    ids = state.item.candidate_ids
    rv.submit(ctx, "ann", state, chosen="3", rejected="1")
    out = {}
    for name, sql in EXAMPLE_QUERIES.items():
        assert export_tab.example(ctx, "boss", name) == sql
        out[name] = export_tab.preview(ctx, "boss", sql, 1000).rows
    overrides = out["human vs AI overrides"]
    mine = overrides[(overrides.prompt_id == shown) & (overrides.annotator == "ann")]
    assert set(mine.judge) == {"critic", "gemini"}
    assert (mine.human_chosen == ids[2]).all()
    judged_best = {j: mine[mine.judge == j].ai_chosen.item() for j in ("critic", "gemini")}
    assert list(mine.overrides_ai) == [judged_best[j] != ids[2] for j in mine.judge]
    spread = out["judge disagreement"]
    assert len(spread) == 12 and spread.spread.is_monotonic_decreasing
    assert set(out["annotator activity"].annotator) == {"ann"}
    assert list(out["rounds at a glance"].round_id) == [1]


def test_exports_download_files(server, tmp_path):
    url, ctx, _ = server
    boss = client(url, "boss")
    sql = "SELECT prompt_id, question FROM prompts WHERE split = 'train' ORDER BY prompt_id"
    for fmt in ("parquet", "jsonl", "csv"):
        path, summary = boss.predict(sql, fmt, api_name="/export_query")
        assert summary == f"exported 5 rows as {fmt}" and path.endswith("." + fmt)
        reader = {"parquet": "read_parquet", "jsonl": "read_json", "csv": "read_csv"}[fmt]
        got = duckdb.sql(f"SELECT prompt_id FROM {reader}(?) ORDER BY 1", params=[path]).fetchall()
        assert [r[0] for r in got] == ["p0", "p1", "p2", "p3", "p4"]
    assert str(studio_of(ctx).downloads) != str(ctx.ws.root) and not str(studio_of(ctx).downloads).startswith(
        str(ctx.ws.root))
    pairs_db.insert_pairs(ctx.ws.cursor(), [{"round_id": 1, "prompt_id": "p0", "chosen_id": "p0c0",
                                             "rejected_id": "p0c2", "source": "human", "strategy": "human"}])
    path, summary = boss.predict("1", "parquet", api_name="/export_pairs")
    assert summary == "exported 1 pairs (round 1) as parquet"
    t = pq.read_table(path)
    assert {"images", "prompt", "chosen", "rejected", "round_id", "source"} <= set(t.column_names)
    row = t.to_pylist()[0]
    assert row["chosen"][0]["content"][0]["text"].startswith("answer 0 of p0") and row["source"] == "human"
    path, _ = boss.predict("all rounds", "llava", api_name="/export_pairs")
    assert len(json.loads(Path(path).read_text())) == 1
    with pytest.raises(Exception, match="does not exist"):
        boss.predict("7", "parquet", api_name="/export_pairs")
    details = [json.loads(r["detail"]) for r in audit_rows(ctx, "export") if r["actor"] == "boss"]
    assert {(d["pairs"], d["format"]) for d in details} >= {(False, "parquet"), (False, "jsonl"), (False, "csv"),
                                                            (True, "parquet"), (True, "llava")}
    assert boss.predict(api_name="/pair_rounds")["choices"] == [["all rounds", "all rounds"], ["1", "1"]]


# ---------------------------------------------------------------------------------------------- data

def test_upload_imports_prompts(server, tmp_path):
    url, ctx, _ = server
    boss = client(url, "boss")
    upload = parquet_upload(tmp_path / "fresh.parquet")
    summary, report, prompts, _, _ = boss.predict(handle_file(str(upload)), "heldout", "", False,
                                                  api_name="/import_upload")
    assert summary.startswith("fresh.parquet: 2 new prompts") and report["value"] is None
    stored = [p for p in prompts_db.list_prompts(ctx.ws.cursor()) if p["source"] == "fresh.parquet"]
    assert sorted(p["question"] for p in stored) == ["uploaded question 0?", "uploaded question 1?"]
    assert {p["split"] for p in stored} == {"heldout"}
    assert ["fresh.parquet", "heldout", 2] in prompts["data"]
    assert json.loads(audit_rows(ctx, "import")[0]["detail"])["new_prompts"] == 2

    img = make_image(tmp_path / "z.png", size=(25, 25), color=(1, 2, 3)).read_bytes()
    zipped = zip_upload(tmp_path / "batch.zip", [{"image": "z.png", "question": "zipped?", "reference": "red"}],
                        {"z.png": img})
    summary, *_ = boss.predict(handle_file(str(zipped)), "train", "zipped batch", False, api_name="/import_upload")
    assert "1 new prompts" in summary
    (p,) = [p for p in prompts_db.list_prompts(ctx.ws.cursor()) if p["source"] == "zipped batch"]
    assert p["question"] == "zipped?" and (ctx.ws.root / p["image_path"]).is_file()

    evil = zip_upload(tmp_path / "evil.zip", [{"image": "z.png", "question": "evil?"}], {"z.png": img},
                      extra={"../../escaped.txt": b"x"})
    with pytest.raises(Exception, match="points outside the archive"):
        boss.predict(handle_file(str(evil)), "train", "", False, api_name="/import_upload")
    assert not (tmp_path / "escaped.txt").exists()


def test_upload_with_bad_rows(ctx, tmp_path):
    img = make_image(tmp_path / "ok.png", size=(21, 21)).read_bytes()
    zipped = zip_upload(tmp_path / "mixed.zip", [{"image": "ok.png", "question": "fine?"},
                                                 {"image": "missing.png", "question": "broken?"}], {"ok.png": img})
    before = prompts_db.count_prompts(ctx.ws.cursor())
    with pytest.raises(UsageError, match=r"1 bad rows, nothing was imported(.|\n)*line 2: image not found"):
        data_tab.import_upload(ctx, "boss", str(zipped))
    assert prompts_db.count_prompts(ctx.ws.cursor()) == before
    imported = data_tab.import_upload(ctx, "boss", str(zipped), skip_bad=True)
    summary, report = imported.summary, imported.reject_report
    assert "1 new prompts" in summary and "1 bad rows skipped" in summary
    (bad,) = [json.loads(line) for line in Path(report).read_text().splitlines()]
    assert bad["line"] == 2 and "image not found" in bad["error"]
    assert Path(report).is_relative_to(studio_of(ctx).downloads)
    with pytest.raises(UsageError, match="upload a"):
        data_tab.import_upload(ctx, "boss", str(tmp_path / "notes.txt"))


def test_judge_runs_in_the_background_and_counts_show(server):
    url, ctx, _ = server
    cur = ctx.ws.cursor()
    image_id = cur.execute("SELECT image_id FROM images ORDER BY image_id LIMIT 1").fetchall()[0][0]
    prompts_db.insert_prompts(cur, [{"prompt_id": "ref1", "image_id": image_id, "question": "What colour?",
                                     "source": "test", "split": "train", "reference": "red"}])
    prompts_db.insert_candidates(cur, [{"candidate_id": f"ref1c{i}", "prompt_id": "ref1", "round_id": 1,
                                        "text": text, "origin": "policy", "sample_index": i}
                                       for i, text in enumerate(["It is red.", "Blue, I think."])])
    boss = client(url, "boss")
    _, rounds_, judges = boss.predict(api_name="/data_counts")
    assert judges["data"] == [[1, "critic", "ok", 12], [1, "gemini", "ok", 12]]
    assert rounds_["headers"] == ["round_id", "status", "candidates", "eval_answers", "human_labels", "pairs"]
    assert "judge reference started by boss" in boss.predict("reference", None, api_name="/run_judge")
    run = studio_of(ctx).runner.wait(60)
    assert run["status"] == "done" and run["kind"] == "judge", run
    assert "reference judged 2 candidates of 1 prompts" in run["message"]
    _, _, judges = boss.predict(api_name="/data_counts")
    assert [1, "reference", "ok", 2] in judges["data"]
    html_, *_ = boss.predict(api_name="/data_status")
    assert "judge reference" in html_ and "done" in html_
    assert json.loads(audit_rows(ctx, "judge")[0]["detail"])["via"] == "app"
    with pytest.raises(Exception, match="not in the list of choices"):
        boss.predict("oracle", None, api_name="/run_judge")
    with pytest.raises(UsageError, match="unknown judge 'oracle'"):  # the handler's own check
        data_tab.run_judge(ctx, "boss", "oracle")


def test_snapshot_download(server):
    url, ctx, _ = server
    path = client(url, "boss").predict(api_name="/snapshot")
    assert path.endswith(".duckdb") and not Path(path).is_relative_to(ctx.ws.root)
    con = duckdb.connect(path, read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM prompts WHERE prompt_id = 'p0'").fetchone()[0] == 1
    finally:
        con.close()
    assert audit_rows(ctx, "snapshot")[0]["actor"] == "boss"


# ---------------------------------------------------------------------------------------------- rounds

def test_round_details_show_pairs_curves_and_eval(ctx):
    cur = ctx.ws.cursor()
    pairs_db.insert_pairs(cur, [
        {"round_id": 1, "prompt_id": p, "chosen_id": f"{p}c0", "rejected_id": f"{p}c1", "source": src, "strategy": "x"}
        for p, src in (("p0", "human"), ("p1", "seva"), ("p2", "seva"))])
    rounds.add_train_metrics(cur, 1, [{"step": s, "loss": 0.7 - 0.1 * s, "margin": 0.1 * s, "accuracy": 0.5 + 0.1 * s}
                                      for s in (1, 2, 3)])
    rounds.add_eval(cur, round_id=1, baseline_checkpoint_id="c0", checkpoint_id="c1", judge="reference", wins=3,
                    losses=1, ties=2, n=6)
    d = rounds_tab.details(ctx, "boss")
    assert d["round_id"] == 1 and d["choices"] == [1]
    assert d["pairs"].values.tolist() == [["human", 1], ["seva", 2]]
    assert d["evals"].values.tolist() == [["reference", "c0", "c1", 3, 1, 2, 6]]
    curve = d["curve"]
    assert list(curve.columns) == ["step", "loss", "margin", "accuracy"]
    assert curve.step.tolist() == [1, 2, 3] and curve.loss.round(3).tolist() == [0.6, 0.5, 0.4]
    assert curve.margin.round(3).tolist() == [0.1, 0.2, 0.3] and curve.accuracy.round(3).tolist() == [0.6, 0.7, 0.8]
    with pytest.raises(UsageError, match="does not exist"):
        rounds_tab.details(ctx, "boss", 9)


def test_start_busy_cancel_through_the_app(server):
    url, ctx, _ = server
    boss = client(url, "boss")
    studio = studio_of(ctx)
    busy = r"a judge is already running \(judge \(held by the test\), started by cli:test"
    with studio.runner.hold("judge", "judge (held by the test)", "cli:test"), pytest.raises(Exception, match=busy):
        boss.predict(api_name="/start_round")
    assert "round 1 started by boss" in boss.predict(api_name="/start_round")
    with pytest.raises(Exception, match="a round is already running"):
        boss.predict(api_name="/start_round")
    wait_until(lambda: studio.runner.snapshot()["step"] is not None, 60, "the round's first step to start")
    t1 = time.time()  # the app answers while the round's job runs
    assert client(url, "ann").predict(api_name="/next")[0] and time.time() - t1 < 20
    assert "cancel requested" in boss.predict(api_name="/cancel_round")
    run = studio.runner.wait(120)
    assert run["status"] == "cancelled", run
    state, progress, log, *_ = boss.predict(None, api_name="/rounds_status")
    assert "state <b>cancelled</b>" in state
    assert 'data-status="cancelled"' in progress and "round 1: generate running" in log
    assert [r["actor"] for r in audit_rows(ctx, "round.start")][:1] == ["boss"]
    assert json.loads(audit_rows(ctx, "round.cancel")[0]["detail"])["running"] is True
    assert audit_rows(ctx, "round.cancel")[0]["actor"] == "boss"


def test_progress_rendering_escapes_and_counts():
    run = {"run_id": 1, "kind": "round", "label": "round <b>2</b>", "user": "<img src=x onerror=alert(1)>",
           "status": "running", "message": "", "round_id": 2, "step": "train", "progress": (3, 4, "steps"),
           "seconds": 5.0, "lines": []}
    out = rounds_tab.progress_html(run)
    assert "<img" not in out and "&lt;img" in out and "round &lt;b&gt;2&lt;/b&gt;" in out
    assert "step 5 of 7: train" in out and "3/4 steps" in out
    # generate, judge, review, pairs done (4 of 7) + 3/4 of train
    assert 'value="0.679"' in out
