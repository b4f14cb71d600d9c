"""The running studio through gradio_client and plain HTTP: login, labelling, role and session refusals,
the file route, escaping; the `prefloop users` and `prefloop serve` commands in real subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AuthenticationError

from app.server import AppContext
from app.server.app import launch
from storage import audit
from storage import prompts as prompts_db
from storage import users as users_db
from storage.workspace import init_workspace, open_workspace
from tests.helpers import REPO, build_workspace, free_port, run_cli, shown, wait_port


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ws = build_workspace(tmp_path_factory.mktemp("srv") / "ws")
    (ws.lay.runs / "r001").mkdir(parents=True)
    (ws.lay.runs / "r001" / "config.json").write_text("{}")
    (ws.lay.checkpoints / "c0").mkdir(parents=True, exist_ok=True)
    (ws.lay.checkpoints / "c0" / "meta.json").write_text("{}")
    ctx = AppContext(ws)
    demo, url = launch(ctx, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url, ctx
    demo.close()
    ws.close()


def client(url: str, name: str, password: str | None = None) -> Client:
    return Client(url, auth=(name, password or f"{name}-password"), verbose=False)


def test_login_label_and_read_back(server):
    url, ctx = server
    c = client(url, "ann")
    first = c.predict(api_name="/next")
    html_ = first[0]
    assert shown(html_) == "p2" and first[1]["choices"] == [["#1", "1"], ["#2", "2"], ["#3", "3"]]
    out = c.predict("3", "1", "", False, "via the API", None, api_name="/submit")
    assert shown(out[0]) == "p1", "the next item comes back with the submit"
    (label,) = prompts_db.list_labels(ctx.ws.cursor(), prompt_id="p2")
    assert (label["annotator"], label["chosen_id"], label["rejected_id"], label["comment"]) == \
        ("ann", "p2c2", "p2c0", "via the API")
    rec = audit.recent(ctx.ws.cursor(), action="label")[0]
    assert rec["actor"] == "ann" and '"prompt_id": "p2"' in rec["detail"]
    assert "&lt;script&gt;" in out[0] and "<script" not in out[0] and "<img src=x" not in out[0]
    undone = c.predict(api_name="/undo")
    assert shown(undone[0]) == "p2"
    assert [r["kind"] for r in prompts_db.list_labels(ctx.ws.cursor(), prompt_id="p2")] == ["label", "undo"]
    assert c.predict(api_name="/ping") == "ok"


def test_annotator_refused_on_admin_endpoints(server):
    url, _ = server
    c = client(url, "bob")
    for endpoint in ("/refresh_queue", "/list_users"):
        with pytest.raises(Exception, match="needs the admin role"):
            c.predict(api_name=endpoint)
    admin = client(url, "boss")
    assert "prompts queued" in admin.predict(api_name="/refresh_queue")
    names = [row[0] for row in admin.predict(api_name="/list_users")["data"]]
    assert names == ["boss", "ann", "bob", "cat"]


def test_unauthenticated_calls_refused(server):
    url, ctx = server
    with pytest.raises(AuthenticationError, match="credentials were not provided"):
        Client(url, verbose=False)
    for path in ("gradio_api/call/submit", "gradio_api/call/refresh_queue", "gradio_api/queue/join"):
        r = httpx.post(url + path, json={"data": [], "fn_index": 0, "session_hash": "x"})
        assert r.status_code == 401, path
    with pytest.raises(ValueError, match="Could not login"):
        client(url, "ann", "not-the-password")
    fail = audit.recent(ctx.ws.cursor(), action="login_failed")[0]
    assert fail["actor"] == "ann" and "not-the-password" not in fail["detail"]


def test_file_route_serves_images_only(server):
    url, ctx = server
    lay = ctx.ws.lay
    http = httpx.Client()
    assert http.post(url + "login", data={"username": "boss", "password": "boss-password"}).status_code == 200
    image = next(lay.images.rglob("*.png"))
    assert http.get(url + f"gradio_api/file={image}").status_code == 200
    ctx.ws.cursor().execute("CHECKPOINT")
    secrets = [lay.db, lay.config, lay.owner, lay.runs / "r001" / "config.json", lay.checkpoints / "c0" / "meta.json",
               f"{lay.images}/../{lay.db.name}", "prefloop.duckdb", "/etc/passwd"]
    for p in secrets:
        for route in ("gradio_api/file=", "gradio_api/file/"):
            r = http.get(url + f"{route}{p}")
            assert r.status_code in (403, 404), (p, r.status_code)
            assert b"DUCK" not in r.content[:64]


# ------------------------------------------------------------------------------------------------ the CLI

def test_users_command(tmp_path):
    init_workspace(tmp_path / "w").close()
    w = str(tmp_path / "w")
    r = run_cli("users", "add", "lead", "--role", "admin", "-w", w, input="lead-password-1\n")
    assert r.returncode == 0, r.stderr
    assert run_cli("users", "add", "ann", "-w", w, input="short\n").returncode == 2
    assert run_cli("users", "add", "ann", "-w", w, input="ann-password-1\n").returncode == 0
    r = run_cli("users", "list", "-w", w)
    assert "lead" in r.stdout and "admin" in r.stdout and "ann" in r.stdout and "annotator" in r.stdout
    assert run_cli("users", "passwd", "ann", "-w", w, input="ann-password-2\n").returncode == 0
    r = run_cli("users", "remove", "lead", "-w", w)
    assert r.returncode == 2 and "only admin" in r.stderr
    assert run_cli("users", "remove", "ann", "-w", w).returncode == 0
    r = run_cli("users", "passwd", "ghost", "-w", w, input="whatever-123\n")
    assert r.returncode == 2 and "no user named 'ghost'" in r.stderr
    with open_workspace(w) as ws:
        cur = ws.cursor()
        assert users_db.verify_password("lead-password-1", users_db.password_hash(cur, "lead"))
        assert users_db.get_user(cur, "ann") is None
        actions = [a["action"] for a in audit.recent(cur)]
        assert actions[:4] == ["user_remove", "user_passwd", "user_add", "user_add"]
        dump = str(audit.recent(cur)) + str(cur.execute("SELECT * FROM users").fetchall())
        assert "lead-password-1" not in dump and "ann-password" not in dump


def test_serve_command_owns_the_workspace(tmp_path):
    ws = build_workspace(tmp_path / "ws")
    ws.close()
    w = str(tmp_path / "ws")
    bare = tmp_path / "bare"
    init_workspace(bare).close()
    r = run_cli("serve", "-w", str(bare), "--port", str(free_port()))
    assert r.returncode == 2 and "no admin user" in r.stderr and "users add" in r.stderr
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "-w", w, "--port", str(port)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_port(port, proc)
        c = client(f"http://127.0.0.1:{port}/", "cat")
        assert shown(c.predict(api_name="/next")[0]) == "p2"
        c.predict("1", "2", "", False, "", None, api_name="/submit")
        r = run_cli("status", "-w", w)
        assert r.returncode == 3 and "in use by prefloop serve" in r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert not (tmp_path / "ws" / "owner.json").exists(), "a clean stop releases the workspace"
    with open_workspace(w) as ws:
        assert [(r["annotator"], r["prompt_id"]) for r in prompts_db.list_labels(ws.cursor())] == [("cat", "p2")]
