"""Plain helpers the test modules share (the fixtures are in conftest.py): paths and subprocesses, polling,
test images, and the workspaces and training runs that several modules build."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


# ---- processes, ports, polling -------------------------------------------------------------------------------

def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy and return that; fail naming ``what`` after
    ``timeout`` seconds. An assertion raised by the predicate (e.g. "the server exited") fails at once."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, input: str | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `prefloop ARGS` in a real subprocess (as a user would)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "app.cli", *args], check=False, cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, input=input, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    """Wait until ``proc`` (e.g. `prefloop serve`) listens on ``port``; fail at once if it exits."""
    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited early: {proc.stderr.read() if proc.stderr else proc.returncode}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, timeout, f"serve to listen on port {port}", interval=0.2)


def job_child(owner_pid: int, needle: str):
    """The owner's (grand)child process whose command line contains ``needle`` (a job), or None."""
    import psutil

    for child in psutil.Process(owner_pid).children(recursive=True):
        try:
            if needle in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def wait_for_job(owner: subprocess.Popen, needle: str, timeout: float = 600):
    """The owner's ``needle`` job process (psutil.Process) once it runs; fails if the owner exits first."""
    def found():
        assert owner.poll() is None, f"the owner exited before its {needle} job started: {owner.communicate()}"
        return job_child(owner.pid, needle)

    return wait_until(found, timeout, f"a {needle} job")


def cpu_seconds(proc) -> float:
    """User + system CPU time of a psutil.Process (0 once it is gone): how far a job got, whatever the load."""
    import psutil

    try:
        t = proc.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return t.user + t.system


# ---- images and the studio ----------------------------------------------------------------------------------

def make_image(path: Path, size=(48, 40), color=(200, 30, 30), fmt: str | None = None) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    for x in range(0, size[0], 7):
        img.putpixel((x, x % size[1]), (x % 255, 255 - x % 255, 100))
    img.save(path, format=fmt)
    return path


def shown(html_: str) -> str | None:
    """The prompt id the review screen shows (from its "round N · prompt X" line)."""
    m = re.search(r"· prompt ([\w-]+)</div>", html_)
    return m.group(1) if m else None


# ---- workspaces -----------------------------------------------------------------------------------------------

def review_workspace(root: Path, tiny_model_dir: Path, rows: list[dict], changes: dict, name: str | None = None):
    """An open workspace on `tiny` with ``rows`` imported (``prefloop import`` JSONL rows whose ``image`` names
    a file already under ``root/data``) and ``changes`` applied to the config; round 1 stands at its review
    step (the answers were imported, so generate and judge have nothing to do)."""
    from app.importer import import_path
    from core import config as cfgmod
    from storage import rounds
    from storage.workspace import init_workspace

    data = root / "data"
    (data / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    base = cfgmod.WorkspaceConfig(policy=cfgmod.PolicyConfig(model="tiny"), **({"name": name} if name else {}))
    ws = init_workspace(root / "ws", cfgmod.update(base, changes))
    shutil.copytree(tiny_model_dir, ws.lay.checkpoints / "c0")
    cur = ws.cursor()
    rounds.ensure_first_round(cur, base_model="tiny")
    import_path(ws, data / "q.jsonl", progress=False)
    rounds.set_round(cur, 1, step="review")
    return ws


# Per prompt: (critic overall per candidate, gemini overall per candidate); None = no judgments.
SCORES = {
    "p0": ([0.9, 0.5, 0.1], [0.9, 0.5, 0.1]),   # disagreement 0,    critic margin 0.8,  gemini margin 0.8
    "p1": ([0.6, 0.5, 0.4], [0.6, 0.5, 0.0]),   # disagreement 0.4,  critic margin 0.2,  gemini margin 0.6
    "p2": ([0.8, 0.2, 0.3], [0.1, 0.2, 0.3]),   # disagreement 0.7,  critic margin 0.6,  gemini margin 0.2
    "p3": ([0.5, 0.45, 0.5], [0.5, 0.5, 0.5]),  # disagreement 0.05, critic margin 0.05, gemini margin 0
    "p4": None,                                 # unscored: last in both
}
XSS_Q = 'What is <script>alert("q")</script> here?'
XSS_A = '<img src=x onerror=alert(1)> and <b>bold</b> & "quotes"'


def add_judgment(cur, cid: str, judge: str, overall: float, **cols) -> None:
    cols = {"helpfulness": None, "correctness": None, "coherence": None, "complexity": None, "verbosity": None,
            "score": None, "reasoning": None, **cols}
    cur.execute("""INSERT INTO judgments (judgment_id, candidate_id, judge, judge_version, helpfulness, correctness,
                       coherence, complexity, verbosity, score, overall, reasoning, status)
                   VALUES (?, ?, ?, 'v1', ?, ?, ?, ?, ?, ?, ?, ?, 'ok')""",
                [f"{judge}:{cid}", cid, judge, cols["helpfulness"], cols["correctness"], cols["coherence"],
                 cols["complexity"], cols["verbosity"], cols["score"], overall, cols["reasoning"]])


def build_workspace(root, *, overlap: int = 1, order: str = "disagreement", model: str = "tiny",
                    pairs_judge: str | None = None, scores: dict | None = None, k: int = 3):
    """A workspace with one image, prompts p0..pN (3 candidates each, critic + gemini judgments) and users."""
    from core import config as cfgmod
    from storage import images as images_db
    from storage import prompts as prompts_db
    from storage import rounds
    from storage import users as users_db
    from storage.workspace import init_workspace

    cfg = cfgmod.WorkspaceConfig(policy=cfgmod.PolicyConfig(model=model),
                                 pairs=cfgmod.PairsConfig(judge=pairs_judge),
                                 review=cfgmod.ReviewConfig(overlap=overlap, queue_order=order))
    ws = init_workspace(root, cfg)
    cur = ws.cursor()
    rounds.ensure_first_round(cur, base_model=model)
    src = make_image(root.parent / "src.png")
    data = src.read_bytes()
    image_id = hashlib.sha256(data).hexdigest()
    rel = images_db.store_relpath(image_id, "PNG")
    images_db.write_atomic(ws.root / rel, data)
    images_db.insert_images(cur, [{"image_id": image_id, "path": rel, "width": 48, "height": 40, "format": "PNG",
                                   "n_bytes": len(data)}])
    scores = SCORES if scores is None else scores
    prompts_db.insert_prompts(cur, [{"prompt_id": pid, "image_id": image_id, "question": f"{XSS_Q} ({pid})",
                                     "source": "test", "split": "train"} for pid in scores])
    prompts_db.insert_candidates(cur, [{"candidate_id": f"{pid}c{i}", "prompt_id": pid, "round_id": 1,
                                        "text": f"answer {i} of {pid}: {XSS_A}", "origin": "policy", "sample_index": i}
                                       for pid in scores for i in range(k)])
    for pid, sc in scores.items():
        if sc is None:
            continue
        critic, gemini = sc
        for i in range(k):
            add_judgment(cur, f"{pid}c{i}", "critic", critic[i], score=critic[i] * 100)
            add_judgment(cur, f"{pid}c{i}", "gemini", gemini[i], helpfulness=gemini[i] * 4, correctness=2, coherence=3,
                         complexity=1, verbosity=2, reasoning=f"<script>steal()</script> reasoning {i}")
    users_db.add_user(cur, "boss", "admin", "boss-password")
    for name in ("ann", "bob", "cat"):
        users_db.add_user(cur, name, "annotator", f"{name}-password")
    return ws


ROUND_CONFIG = {"generation.k": 2, "generation.max_new_tokens": 8, "generation.views": ["original", "aug:hflip"],
                "round.eval_judge": "reference", "train.batch_size": 2}


def make_data(root: Path) -> Path:
    data = root / "data"
    rows = []
    for i in range(5):
        make_image(data / f"img{i}.png", size=(40 + i, 36), color=(50 * i % 255, 90, 200 - 30 * i))
        rows.append({"image": f"img{i}.png", "question": f"What colour is shape {i}?"})
    for i in range(2):
        rows.append({"image": f"img{i}.png", "question": f"Which colour is it, {i}?", "split": "heldout",
                     "reference": "red"})
    (data / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return data / "q.jsonl"


def make_ws(root: Path, tiny_model_dir: Path, *, model: str = "tiny", data: Path | None = None,
            **changes) -> Path:
    """A workspace on ``model`` (its build in ``tiny_model_dir`` becomes c0) with ``data`` (a `prefloop
    import` file; default: make_data's) imported and the small round config (CLI in-process)."""
    from app.cli import main as cli_main
    from core import config as cfgmod

    ws = root / "ws"
    assert cli_main(["init", str(ws), "--model", model]) == 0
    shutil.copytree(tiny_model_dir, ws / "checkpoints" / "c0")
    assert cli_main(["import", "-w", str(ws), str(data or make_data(root))]) == 0
    cfg = cfgmod.update(cfgmod.load(ws / "prefloop.toml"), {**ROUND_CONFIG, **changes})
    cfgmod.save(cfg, ws / "prefloop.toml")
    return ws


def unset(ws: Path, *keys: str) -> None:
    """Remove dotted ``keys`` from the workspace's prefloop.toml (they fall back to a recipe's or the default)."""
    from core import config as cfgmod

    data = cfgmod.explicit(cfgmod.load(ws / "prefloop.toml"))
    for dotted in keys:
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    cfgmod.save(cfgmod.validate(data), ws / "prefloop.toml")


def q(ws: Path, sql: str, params=None):
    """Rows of ``sql`` on the workspace database, through a read-only connection."""
    import duckdb

    con = duckdb.connect(str(ws / "prefloop.duckdb"), read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


GENERATE_QUESTIONS = ["What is in the image?", "What color is the car?", "How many apples are there?"]


def write_generate_run(run_dir: Path, model_dir: Path, n_prompts: int = 3, **overrides) -> Path:
    """A generate job's run folder: ``n_prompts`` prompts on small images and the owner's nested config."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from core.config import GenerationConfig, PolicyConfig

    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt_id": f"p{i}", "question": GENERATE_QUESTIONS[i % 3],
             "image_path": str(make_image(run_dir / "img" / f"{i}.png", color=(80 * i, 40, 160)).resolve())}
            for i in range(n_prompts)]
    pq.write_table(pa.Table.from_pylist(rows), run_dir / "prompts.parquet")
    flat = {"model_path": str(model_dir), "engine": "hf", "dtype": "float32", "device": "cpu", "k": 2,
            "temperature": 0.8, "top_p": 0.9, "max_new_tokens": 8, "seed": 7, "batch_size": 2,
            "views": ["original", "aug:diffusion:500", "aug:flip"], "round_id": 1, "checkpoint_id": "c0",
            "model": "tiny", "tensor_parallel_size": 1, **overrides}
    # the owner's nested form: the workspace's policy and generation sections beside the run's keys
    sections = {"policy": PolicyConfig.model_fields, "generation": GenerationConfig.model_fields}
    config = {name: {k: v for k, v in flat.items() if k in fields} for name, fields in sections.items()}
    config.update({k: v for k, v in flat.items() if not any(k in fields for fields in sections.values())})
    (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir


# ---- training runs --------------------------------------------------------------------------------------------

LM_WEIGHT = "language_model.model.layers.0.self_attn.q_proj.weight"  # as saved on disk


def make_pairs(root: Path, n: int = 6) -> list[dict]:
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200),
              (120, 120, 120), (10, 10, 10)]
    rows = []
    for i in range(n):
        image = make_image(root / "images" / f"img{i}.png", color=colors[i % len(colors)])
        rows.append({"prompt_id": f"p{i}", "chosen_id": f"p{i}-c", "rejected_id": f"p{i}-r",
                     "image_path": str(image), "question": f"What color is the car number {i}?",
                     "chosen_text": f"The car is blue and there are {i + 1} apples on the table.",
                     "rejected_text": f"A horse runs near {i + 2} coins."})
    return rows


def make_run(root: Path, model_path: Path, pairs: list[dict], ref_model_path: Path | None = None,
             checkpoint_id: str = "c1", parent_id: str = "c0", **train) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    run_dir = root / f"run-{checkpoint_id}"
    run_dir.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(pairs), run_dir / "pairs.parquet")
    from core.config import TrainConfig

    flat = {"model_path": str(model_path), "ref_model_path": str(ref_model_path or model_path),
            "output_dir": str(root / "checkpoints" / checkpoint_id), "round_id": 1,
            "checkpoint_id": checkpoint_id, "parent_id": parent_id, "base_model": "tiny",
            "pairs_hash": f"hash-{checkpoint_id}", "device": "cpu", "dtype": "float32",
            "lora_r": 4, "lora_alpha": 8, "batch_size": 2, "learning_rate": 1e-3, **train}
    # the owner's nested form: the TrainConfig keys under "train", the run's keys (max_steps, ...) beside it
    config = {k: v for k, v in flat.items() if k not in TrainConfig.model_fields}
    config["train"] = {k: v for k, v in flat.items() if k in TrainConfig.model_fields}
    (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir


def run_job(run_dir: Path, timeout: float = 600) -> tuple[int, list[dict], str]:
    """The train job of ``run_dir`` in a subprocess with the environment the owner gives a job:
    (exit code, its JSON-lines events, its stderr)."""
    from backend.job_runner import job_env

    proc = subprocess.run([sys.executable, "-m", "backend.jobs.train", str(run_dir)], cwd=REPO, check=False,
                          capture_output=True, text=True, timeout=timeout, env=job_env())
    events = [json.loads(line) for line in proc.stdout.splitlines()]  # stdout is the JSON-lines protocol only
    return proc.returncode, events, proc.stderr


def run_launcher(cmd: list[str]) -> tuple[list[dict], str]:
    """Run a training command line (e.g. the deepspeed launcher's) to success, with the environment the owner
    gives a job of that many ranks: (its events, its stderr)."""
    from backend.job_runner import job_env
    from backend.progress import parse_line

    ranks = int(cmd[cmd.index("--num_gpus") + 1]) if "--num_gpus" in cmd else 1
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200, check=False,
                          env=job_env(processes=ranks))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [parse_line(line) for line in proc.stdout.splitlines()], proc.stderr


def of(events: list[dict], kind: str) -> list[dict]:
    return [e for e in events if e["event"] == kind]


def weight(folder: Path, name: str = LM_WEIGHT):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))[name]
