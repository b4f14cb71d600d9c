"""CLI forwarding: with the studio running (in-process, and as `prefloop serve`), the lead's commands run in
real `prefloop` subprocesses and reach it through the admin API; other commands get the "in use" error."""

from __future__ import annotations

import getpass
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import httpx
import pytest

from app.forward import admin_info, rewrite_paths, strip_workspace
from app.server import AppContext
from app.server.app import launch
from app.server.runner import studio_of
from storage import audit
from storage import prompts as prompts_db
from storage import users as users_db
from storage.workspace import open_workspace
from tests.helpers import REPO, build_workspace, free_port, make_image, run_cli, wait_port, wait_until

ME = f"cli:{getpass.getuser()}"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("fwd") / "ws"
    build_workspace(root).close()
    ws = open_workspace(root, command="prefloop serve")
    ctx = AppContext(ws)
    demo, _ = launch(ctx, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield ctx
    demo.close()
    studio_of(ctx).runner.wait(120)
    ws.close()


def info_of(ctx) -> dict:
    return json.loads((ctx.ws.root / "admin.json").read_text())


def token_of(ctx) -> str:
    return (ctx.ws.root / "admin.token").read_text().strip()


def data_dir(root: Path, n: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        make_image(root / f"im{i}.png", size=(33 + i, 30), color=(20 * i, 60, 90))
        rows.append({"image": f"im{i}.png", "question": f"forwarded question {i}?"})
    (root / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def test_admin_files_are_private(served):
    ctx = served
    for name in ("admin.token", "admin.json"):
        assert stat.S_IMODE((ctx.ws.root / name).stat().st_mode) == 0o600, name
    info = info_of(ctx)
    assert info["pid"] == os.getpid() and info["url"].startswith("http://127.0.0.1:")
    assert info["url"].endswith("/prefloop-admin/run") and token_of(ctx) not in json.dumps(info)
    assert len(token_of(ctx)) >= 40


def test_import_is_forwarded(served, tmp_path):
    ctx = served
    data = data_dir(tmp_path / "data")
    t0 = time.time()
    r = run_cli("import", "q.jsonl", "-w", str(ctx.ws.root), cwd=data)  # a relative path, from another folder
    assert r.returncode == 0, r.stderr
    assert "2 new prompts" in r.stdout
    stored = [p for p in prompts_db.list_prompts(ctx.ws.cursor()) if p["source"] == "q.jsonl"]
    assert sorted(p["question"] for p in stored) == ["forwarded question 0?", "forwarded question 1?"]
    rec = audit.recent(ctx.ws.cursor(), action="import")[0]
    assert rec["actor"] == ME and str(data / "q.jsonl") in rec["detail"]
    fwd = audit.recent(ctx.ws.cursor(), action="forward")[0]
    assert fwd["actor"] == ME and json.loads(fwd["detail"])["code"] == 0
    token = token_of(ctx)
    assert token not in r.stdout + r.stderr and token not in str(audit.recent(ctx.ws.cursor(), 1000))
    assert time.time() - t0 < 120


def test_other_commands_get_the_in_use_error(served):
    ctx = served
    r = run_cli("status", "-w", str(ctx.ws.root))
    assert r.returncode == 3
    assert f"in use by prefloop serve, pid {os.getpid()}" in r.stderr
    r = run_cli("generate", "-w", str(ctx.ws.root))
    assert r.returncode == 3 and "in use by prefloop serve" in r.stderr


def test_wrong_or_missing_token_refused(served):
    ctx = served
    url = info_of(ctx)["url"]
    before = len(audit.recent(ctx.ws.cursor(), 1000, action="forward"))
    body = {"argv": ["users", "add", "mallory", "--role", "admin"], "stdin": "mallory-password\n", "user": "x"}
    for headers in ({}, {"Authorization": "Bearer not-the-token"}, {"Authorization": token_of(ctx)},
                    {"Authorization": "Bearer " + token_of(ctx)[:-1]}):
        r = httpx.post(url, json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json() == {"error": "missing or wrong admin token"}
    assert users_db.get_user(ctx.ws.cursor(), "mallory") is None
    assert len(audit.recent(ctx.ws.cursor(), 1000, action="forward")) == before
    assert audit.recent(ctx.ws.cursor(), action="forward_refused")[0]["actor"] == "cli"
    good = {"Authorization": "Bearer " + token_of(ctx)}
    for argv in (["serve"], ["status"], ["init", "/tmp/x"], []):
        r = httpx.post(url, json={"argv": argv}, headers=good, timeout=30)
        assert r.status_code == 400, argv
    # the CLI with a tampered token file: refused, said so, exit 3
    saved = token_of(ctx)
    (ctx.ws.root / "admin.token").write_text("tampered\n")
    try:
        r = run_cli("users", "list", "-w", str(ctx.ws.root))
    finally:
        (ctx.ws.root / "admin.token").write_text(saved + "\n")
    assert r.returncode == 3 and "refused the command: HTTP 401" in r.stderr and "tampered" not in r.stderr


def test_users_add_with_piped_password(served):
    ctx = served
    r = run_cli("users", "add", "dora", "--role", "annotator", "-w", str(ctx.ws.root), input="dora-password-1\n")
    assert r.returncode == 0 and "added dora (annotator)" in r.stdout, r.stderr
    cur = ctx.ws.cursor()
    assert users_db.verify_password("dora-password-1", users_db.password_hash(cur, "dora"))
    rec = audit.recent(cur, action="user_add")[0]
    assert rec["actor"] == ME and json.loads(rec["detail"]) == {"name": "dora", "role": "annotator"}
    assert "dora-password-1" not in str(audit.recent(cur, 1000)) + r.stdout + r.stderr
    r = run_cli("users", "list", "-w", str(ctx.ws.root))
    assert r.returncode == 0 and "dora" in r.stdout and "boss" in r.stdout
    r = run_cli("users", "add", "eve", "-w", str(ctx.ws.root), input="short\n")
    assert r.returncode == 2 and "at least" in r.stderr and users_db.get_user(cur, "eve") is None


def test_export_and_snapshot_are_forwarded(served, tmp_path):
    ctx = served
    w = str(ctx.ws.root)
    r = run_cli("export", "-w", w, "--sql", "SELECT prompt_id FROM prompts WHERE source = 'test' ORDER BY 1",
                "--out", "out.csv", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.csv").read_text().split() == ["prompt_id", "p0", "p1", "p2", "p3", "p4"]
    r = run_cli("export", "-w", w, "--sql", "DELETE FROM prompts", "--out", "bad.csv", cwd=tmp_path)
    assert r.returncode == 2 and "only SELECT statements are allowed" in r.stderr
    assert not (tmp_path / "bad.csv").exists()
    r = run_cli("snapshot", "snap.duckdb", "-w", w, cwd=tmp_path)
    assert r.returncode == 0 and "wrote snapshot" in r.stdout, r.stderr
    con = duckdb.connect(str(tmp_path / "snap.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM prompts WHERE source = 'test'").fetchone()[0] == 5
    finally:
        con.close()
    r = run_cli("export", "-w", w, "--sql", "SELECT 1", "--out", "x.csv", "--format", "nope", cwd=tmp_path)
    assert r.returncode == 2 and "invalid choice" in r.stderr  # argparse, run in the app, output returned


def test_round_start_runs_in_the_app_and_returns_at_once(served):
    ctx = served
    w = str(ctx.ws.root)
    t0 = time.time()
    r = run_cli("round", "start", "-w", w)
    assert r.returncode == 0, r.stderr
    assert f"round 1 started in the running app (pid {os.getpid()})" in r.stdout
    runner = studio_of(ctx).runner
    run = runner.snapshot()
    assert run["kind"] == "round" and run["user"] == ME and run["status"] == "running"
    assert time.time() - t0 < 60, "the CLI does not wait for the round"
    r = run_cli("judge", "--judge", "reference", "-w", w)
    assert r.returncode == 2 and "a round is already running" in r.stderr
    r = run_cli("round", "start", "-w", w)
    assert r.returncode == 2 and "a round is already running" in r.stderr
    r = run_cli("round", "cancel", "-w", w)  # not forwarded: it writes the cancel request file
    assert r.returncode == 0, r.stderr
    run = runner.wait(120)
    assert run["status"] == "cancelled", run
    r = run_cli("round", "status", "-w", w)
    assert r.returncode == 0 and "cancelled" in r.stdout
    rec = audit.recent(ctx.ws.cursor(), action="round.start")[0]
    assert rec["actor"] == ME and json.loads(rec["detail"])["via"] == "cli"
    r = run_cli("judge", "--judge", "reference", "-w", w)
    assert r.returncode == 0 and "reference" in r.stdout, r.stderr


def test_paths_and_workspace_flags_are_rewritten(tmp_path):
    assert strip_workspace(["import", "-w", "ws", "a.jsonl", "--workspace=x", "-wfoo", "--split", "train"]) == \
        ["import", "a.jsonl", "--split", "train"]
    out = rewrite_paths(["import", "--source", "s.jsonl", "d/q.jsonl", "--reject-report", "r.jsonl", "--skip-bad"],
                        tmp_path)
    assert out == ["import", "--source", "s.jsonl", str(tmp_path / "d/q.jsonl"), "--reject-report",
                   str(tmp_path / "r.jsonl"), "--skip-bad"]
    assert rewrite_paths(["export", "--sql", "SELECT 1", "--out=o.parquet"], tmp_path) == \
        ["export", "--sql", "SELECT 1", f"--out={tmp_path / 'o.parquet'}"]
    assert rewrite_paths(["snapshot", "/abs/s.duckdb", "--force"], tmp_path) == ["snapshot", "/abs/s.duckdb", "--force"]
    assert rewrite_paths(["round", "start", "--config", "c.toml", "--rounds", "2"], tmp_path) == \
        ["round", "start", "--config", str(tmp_path / "c.toml"), "--rounds", "2"]
    assert rewrite_paths(["users", "add", "bob", "--role", "admin"], tmp_path) == ["users", "add", "bob", "--role", "admin"]


def test_stale_admin_file_is_ignored(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    pid = int(dead.stdout)
    (tmp_path / "admin.json").write_text(json.dumps({"url": "http://127.0.0.1:1/prefloop-admin/run", "pid": pid}))
    (tmp_path / "owner.json").write_text(json.dumps({"pid": pid, "command": "prefloop serve"}))
    assert admin_info(tmp_path) is None
    (tmp_path / "admin.json").write_text(json.dumps({"url": "http://x/", "pid": os.getpid()}))
    assert admin_info(tmp_path) is None, "the owner is another process: the file is stale"
    (tmp_path / "owner.json").write_text(json.dumps({"pid": os.getpid(), "command": "prefloop serve"}))
    assert admin_info(tmp_path) == {"url": "http://x/", "pid": os.getpid()}


def test_serve_subprocess_forwards_and_cleans_up(tmp_path):
    build_workspace(tmp_path / "ws").close()
    w = str(tmp_path / "ws")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "-w", w, "--port", str(port)], cwd=REPO,
                            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_port(port, proc)
        wait_until((tmp_path / "ws" / "admin.json").exists, 30, "serve to write admin.json")
        assert json.loads((tmp_path / "ws" / "admin.json").read_text())["pid"] == proc.pid
        r = run_cli("users", "list", "-w", w)
        assert r.returncode == 0 and "boss" in r.stdout, r.stderr
        r = run_cli("status", "-w", w)
        assert r.returncode == 3 and f"in use by prefloop serve, pid {proc.pid}" in r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert not (tmp_path / "ws" / "admin.json").exists() and not (tmp_path / "ws" / "admin.token").exists()
    with open_workspace(w) as ws:
        rows = audit.recent(ws.cursor(), action="forward")
        assert [json.loads(r["detail"])["argv"][0] for r in rows] == ["users"]
