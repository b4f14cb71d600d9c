"""16 annotators label at once through gradio_client, 50 labels each, overlap 1: every acknowledged label is
stored exactly once, and no prompt is ever served to two annotators."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from gradio_client import Client

from storage import prompts as prompts_db
from storage import users as users_db
from storage.workspace import open_workspace
from tests.helpers import REPO, build_workspace, free_port, shown, wait_port

ANNOTATORS = 16
LABELS_EACH = 50
TIME_LIMIT_S = 600


@pytest.fixture(scope="module")
def crowd(tmp_path_factory):
    """`prefloop serve` in its own process (as in production: the clients do not share its GIL)."""
    n = ANNOTATORS * LABELS_EACH + 20  # a few more than needed: the queue never runs dry
    ws = build_workspace(tmp_path_factory.mktemp("crowd") / "ws", order="in_order", overlap=1,
                         scores={f"p{i}": None for i in range(n)})
    cur = ws.cursor()
    for a in range(ANNOTATORS):
        users_db.add_user(cur, f"a{a:02d}", "annotator", f"a{a:02d}-password")
    root = ws.root
    ws.close()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "-w", str(root), "--port", str(port)], cwd=REPO,
                            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_port(port, proc)
        yield f"http://127.0.0.1:{port}/", root, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


def annotate(url: str, name: str, deadline: float) -> dict:
    """Label LABELS_EACH prompts; returns what was served and what the server acknowledged."""
    c = Client(url, auth=(name, f"{name}-password"), verbose=False)
    served, acked = [], []
    current = shown(c.predict(api_name="/next")[0])
    while len(acked) < LABELS_EACH and time.monotonic() < deadline:
        assert current is not None, f"{name}: the queue ran dry after {len(acked)} labels"
        served.append(current)
        out = c.predict("2", "1", "", False, f"by {name}", None, api_name="/submit")  # chosen #2, rejected #1
        acked.append(current)  # predict returned: the server acknowledged this label
        current = shown(out[0])
    c.close()
    return {"name": name, "served": served, "acked": acked}


def test_sixteen_annotators_fifty_labels_each(crowd):
    url, root, proc = crowd
    deadline = time.monotonic() + TIME_LIMIT_S
    start = threading.Barrier(ANNOTATORS)

    def one(i: int) -> dict:
        start.wait(timeout=120)
        return annotate(url, f"a{i:02d}", deadline)

    t0 = time.monotonic()
    with ThreadPoolExecutor(ANNOTATORS) as pool:
        results = list(pool.map(one, range(ANNOTATORS)))
    elapsed = time.monotonic() - t0

    acked = [(r["name"], p) for r in results for p in r["acked"]]
    assert len(acked) == ANNOTATORS * LABELS_EACH, f"only {len(acked)} labels in {elapsed:.0f} s"
    served = [p for r in results for p in r["served"]]
    assert len(served) == len(set(served)), "a prompt was served to two annotators"

    proc.send_signal(signal.SIGTERM)  # a clean stop releases the workspace
    assert proc.wait(60) == 0, proc.stderr.read()[-2000:]
    with open_workspace(root) as ws:
        labels = prompts_db.list_labels(ws.cursor())
    stored = [(r["annotator"], r["prompt_id"]) for r in labels if r["kind"] == "label"]
    assert len(stored) == len(set(stored)) == ANNOTATORS * LABELS_EACH, "none lost, none duplicated"
    assert set(stored) == set(acked)
    assert len({p for _, p in stored}) == len(stored), "overlap 1: one label per prompt"
    assert all(r["chosen_id"] == f"{r['prompt_id']}c1" and r["rejected_id"] == f"{r['prompt_id']}c0" for r in labels)
    print(f"{len(stored)} labels from {ANNOTATORS} annotators in {elapsed:.1f} s "
          f"({len(stored) / elapsed:.1f} labels/s)")
