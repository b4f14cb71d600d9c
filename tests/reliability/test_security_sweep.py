"""Every endpoint of the running studio, called the way the browser calls it (Gradio's queue protocol over
plain HTTP, by fn_index, so "private" load events are reached too): refused without a session, and refused
to an annotator unless it is one of the few an annotator's screen needs. A new endpoint is admin-only
until this file says otherwise. Passwords never reach the logs."""

from __future__ import annotations

import json
import logging
import uuid

import httpx
import pytest

from app.server import AppContext
from app.server.app import launch
from tests.helpers import build_workspace, free_port

# What an annotator's browser calls: the review screen, the keep-alive, the tab visibility.
ANNOTATOR_ENDPOINTS = {"next", "submit", "confirm_ai", "skip", "undo", "ping", "show_tabs"}
# Load events of admin tabs: they run for everyone (Gradio has no per-role load), and must hand an
# annotator nothing: an empty table, a timer left off.
QUIET_FOR_ANNOTATORS = {"_on_load", "on_load", "on_load_1"}
PASSWORDS = ("boss-password", "ann-password", "wrong-password-xyz")


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    ws = build_workspace(tmp_path_factory.mktemp("sweep") / "ws")
    ctx = AppContext(ws)
    demo, url = launch(ctx, port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url, ctx
    demo.close()
    ws.close()


def session(url: str, name: str | None) -> httpx.Client:
    http = httpx.Client(base_url=url, timeout=60)
    if name is not None:
        r = http.post("login", data={"username": name, "password": f"{name}-password"})
        assert r.status_code == 200, r.text
    return http


def app_config(url: str) -> dict:
    http = session(url, "boss")
    try:
        r = http.get("config")
        assert r.status_code == 200
        return r.json()
    finally:
        http.close()


def call(http: httpx.Client, dep: dict, defaults: dict) -> tuple[int, dict | None]:
    """Run one dependency through the queue as the browser does: (join status, final message or None)."""
    session_hash = uuid.uuid4().hex[:10]
    body = {"data": [defaults.get(i) for i in dep["inputs"]], "event_data": None, "fn_index": dep["id"],
            "trigger_id": dep["targets"][0][0] if dep["targets"] else None, "session_hash": session_hash}
    r = http.post("gradio_api/queue/join", json=body)
    if r.status_code != 200:
        return r.status_code, None
    with http.stream("GET", "gradio_api/queue/data", params={"session_hash": session_hash}) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data:"):
                continue
            msg = json.loads(line[5:])
            if msg.get("msg") in ("process_completed", "unexpected_error"):
                return 200, msg
    return 200, None


def endpoints(cfg: dict) -> list[dict]:
    deps = [d for d in cfg["dependencies"] if d.get("backend_fn")]
    assert len(deps) >= 20, "the sweep found the app's endpoints"
    return deps


def defaults_of(cfg: dict) -> dict:
    return {c["id"]: c.get("props", {}).get("value") for c in cfg["components"]}


def test_no_endpoint_answers_without_a_session(studio):
    url, _ = studio
    cfg = app_config(url)
    anonymous = session(url, None)
    assert anonymous.get("config").status_code == 401
    for dep in endpoints(cfg):
        status, msg = call(anonymous, dep, defaults_of(cfg))
        assert status == 401 and msg is None, (dep["api_name"], status, msg)
        if dep.get("api_name"):
            r = anonymous.post(f"gradio_api/call/{dep['api_name']}", json={"data": []})
            assert r.status_code == 401, dep["api_name"]
    anonymous.close()


def test_an_annotator_is_refused_every_admin_endpoint(studio):
    url, ctx = studio
    cfg = app_config(url)
    defaults = defaults_of(cfg)
    deps = {d["api_name"]: d for d in endpoints(cfg)}
    assert ANNOTATOR_ENDPOINTS | QUIET_FOR_ANNOTATORS <= set(deps), "the allow-lists name real endpoints"
    admin_only = sorted(set(deps) - ANNOTATOR_ENDPOINTS - QUIET_FOR_ANNOTATORS)
    assert {"start_round", "cancel_round", "export_query", "import_upload", "run_judge", "list_users",
            "snapshot", "export_pairs"} <= set(admin_only)
    ann, boss = session(url, "ann"), session(url, "boss")
    for name in admin_only:
        status, msg = call(ann, deps[name], defaults)
        assert status == 200 and msg is not None, name
        assert msg["success"] is False and "needs the admin role" in (msg["output"].get("error") or ""), (name, msg)
    for name in sorted(QUIET_FOR_ANNOTATORS):
        _, as_annotator = call(ann, deps[name], defaults)
        _, as_admin = call(boss, deps[name], defaults)
        assert as_annotator["success"] and as_admin["success"], name
        out, full = as_annotator["output"]["data"][0], as_admin["output"]["data"][0]
        assert out != full, f"{name} hands an annotator what it hands an admin"
        if isinstance(out, dict) and "active" in out:
            assert out["active"] is False, name  # the admin tab's timer stays off
        else:
            assert not (out or {}).get("data"), (name, out)  # an empty table
    for name in sorted(ANNOTATOR_ENDPOINTS & {"next", "ping", "show_tabs"}):
        status, msg = call(ann, deps[name], defaults)
        assert status == 200 and msg["success"], (name, msg)
    refusals = ctx.ws.cursor().execute(
        "SELECT count(*) FROM audit_log WHERE actor = 'ann' AND action = 'refused'").fetchone()[0]
    assert refusals >= len(admin_only), "each refusal is in the audit log"
    ann.close()
    boss.close()


def test_passwords_never_reach_the_logs(studio, caplog):
    url, ctx = studio
    caplog.set_level(logging.DEBUG)
    for name, password in (("ann", "ann-password"), ("ann", "wrong-password-xyz"), ("nobody", "wrong-password-xyz")):
        httpx.post(url + "login", data={"username": name, "password": password}, timeout=30)
    assert any("failed login" in r.getMessage() for r in caplog.records), "the failures were logged"
    text = "\n".join(r.getMessage() for r in caplog.records)
    audit_rows = str(ctx.ws.cursor().execute("SELECT * FROM audit_log").fetchall())
    for secret in PASSWORDS:
        assert secret not in text and secret not in audit_rows, secret
