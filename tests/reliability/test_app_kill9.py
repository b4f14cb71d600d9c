"""kill -9 of `prefloop serve` while annotators label and a round trains; then restart.

Every label a client saw acknowledged is in the database, the database opens cleanly, the training job
died with its owner, the interrupted step is marked failed, and `round resume` finishes the round.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
from gradio_client import Client

from storage import prompts as prompts_db
from storage import rounds
from storage import users as users_db
from storage.workspace import open_workspace
from tests.helpers import (
    REPO,
    cpu_seconds,
    free_port,
    make_image,
    review_workspace,
    run_cli,
    shown,
    wait_for_job,
    wait_port,
    wait_until,
)

N_PROMPTS = 40
CONFIG = {"generation.k": 2, "generation.max_new_tokens": 8, "train.batch_size": 2,
          "review.queue_order": "in_order", "round.eval_judge": None}


def build(root, tiny_model_dir):
    """Tiny model, N_PROMPTS prompts with 3 imported answers and one imported preference each; round 1 at
    its review step; users lead (admin), ann and bob."""
    data = root / "data"
    rows = []
    for i in range(N_PROMPTS):
        make_image(data / f"img{i}.png", size=(40 + i % 7, 36), color=(37 * i % 255, 120, 200 - 3 * i))
        rows.append({"id": f"q{i}", "image": f"img{i}.png", "question": f"What colour is shape {i}?",
                     "candidates": [f"It is red ({i}).", f"Blue, I think ({i}).", f"Green ({i})."],
                     "chosen": 0, "rejected": 1})
    ws = review_workspace(root, tiny_model_dir, rows, CONFIG)
    cur = ws.cursor()
    users_db.add_user(cur, "lead", "admin", "lead-password")
    for name in ("ann", "bob"):
        users_db.add_user(cur, name, "annotator", f"{name}-password")
    ws.close()
    return root / "ws"


def serve(w, port: int) -> subprocess.Popen:
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    return subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "-w", str(w), "--port", str(port)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def label_until(url: str, name: str, stop: threading.Event, acked: list) -> None:
    """Label whatever is served until `stop` or the server dies; append each acknowledged prompt."""
    try:
        c = Client(url, auth=(name, f"{name}-password"), verbose=False)
        current = shown(c.predict(api_name="/next")[0])
        while not stop.is_set():
            if current is None:  # the queue is empty for now (the round's pairs are frozen)
                time.sleep(0.3)
                current = shown(c.predict(api_name="/next")[0])
                continue
            out = c.predict("2", "3", "", False, "", None, api_name="/submit")
            acked.append((name, current))  # predict returned: the server acknowledged it
            current = shown(out[0])
    except Exception:  # noqa: BLE001 - the server was killed under us: what was acknowledged counts
        return


def test_kill9_while_labelling_and_training_then_restart(tmp_path, tiny_model_dir):
    w = build(tmp_path, tiny_model_dir)
    port = free_port()
    proc = serve(w, port)
    stop, acked = threading.Event(), []
    threads = []
    try:
        wait_port(port, proc)
        url = f"http://127.0.0.1:{port}/"
        for name in ("ann", "bob"):
            t = threading.Thread(target=label_until, args=(url, name, stop, acked), daemon=True)
            t.start()
            threads.append(t)
        wait_until(lambda: len(acked) >= 6, 60, "the annotators to get going (6 acknowledged labels)")
        lead = Client(url, auth=("lead", "lead-password"), verbose=False)
        assert "started" in lead.predict(api_name="/start_round").lower()
        job = wait_for_job(proc, "backend.jobs.train", timeout=300)  # the round reached its training step
        # killed while the job trains: once it has used 1.5 s of its own CPU time, whatever the machine's load
        wait_until(lambda: cpu_seconds(job) >= 1.5, 120, "the train job to use 1.5 s of CPU")
        n_before_kill = len(acked)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        stop.set()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    for t in threads:
        t.join(60)
    job.wait(60)  # the training job dies with its owner (PR_SET_PDEATHSIG), it is not left running
    assert not psutil.pid_exists(job.pid) or job.status() == psutil.STATUS_ZOMBIE
    assert n_before_kill > 6 or len(acked) > 6, "labels kept arriving while the round ran"

    with open_workspace(w) as ws:  # opens cleanly after the kill: stale owner file, no half-written rows
        cur = ws.cursor()
        stored = {(r["annotator"], r["prompt_id"]) for r in prompts_db.list_labels(cur) if r["kind"] == "label"}
        missing = set(acked) - stored
        assert not missing, f"acknowledged labels lost: {sorted(missing)}"
        steps = {s["step"]: s["status"] for s in rounds.list_steps(cur, 1)}
        assert steps["train"] == "failed", steps  # the interrupted step, found running with its job gone
        assert not (w / "checkpoints" / "r001").exists(), "no half-written checkpoint"
    r = run_cli("round", "resume", "-w", str(w), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    with open_workspace(w) as ws:
        cur = ws.cursor()
        assert rounds.get_round(cur, 1)["status"] == "done"
        assert rounds.get_round(cur, 2)["step"] == "review"
        stored_after = {(r["annotator"], r["prompt_id"]) for r in prompts_db.list_labels(cur) if r["kind"] == "label"}
        assert stored <= stored_after
