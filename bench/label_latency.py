"""Label latency of the review studio at scale.

Builds a workspace with N prompts x 5 candidates x 2 judges (bulk SQL from range(), real image files),
then measures:

  1. the handler alone, in this process: ``app.server.review.submit`` (label + claim of the next item +
     render), p50/p95;
  2. through a real ``prefloop serve`` subprocess and gradio_client from this process: one annotator's
     submit -> next item, interleaved with the no-op endpoint (`/ping`: same app, same session and role
     check, nothing else) so both see the same machine load; p50/p95 and the ratio of the p95s
     (target <= 1.5x);
  3. 8 annotators at once (threads, one gradio_client each): every submit must be in the database and,
     with overlap 1, no prompt may be served twice;
  4. the server process's RSS (DuckDB memory limit from the workspace; torch must not be loaded).

    python bench/label_latency.py [--prompts 100000] [--submits 200] [--annotators 8] [--per-annotator 25]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import os
import re
import subprocess
import tempfile
import threading
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

PROMPT_RE = re.compile(r"· prompt ([A-Za-z0-9_]+)</div>")
K, N_IMAGES = 5, 100


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


# ------------------------------------------------------------------------------------------ client side

def served(out) -> str | None:
    m = PROMPT_RE.search(out[0])
    return m.group(1) if m else None


def latency_phase(url: str, user: str, password: str, submits: int, warmup: int = 20) -> dict:
    """submit -> next item, interleaved with the no-op endpoint so both see the same machine load."""
    from gradio_client import Client

    c = Client(url, auth=(user, password), verbose=False)
    out = c.predict(api_name="/next")
    for _ in range(warmup):
        c.predict(api_name="/ping")
        out = c.predict("1", "2", "", False, "", None, api_name="/submit")
    submit_ms, ping_ms = [], []
    for _ in range(submits):
        t0 = time.perf_counter()
        c.predict(api_name="/ping")
        ping_ms.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        out = c.predict("1", "2", "", False, "", None, api_name="/submit")
        submit_ms.append((time.perf_counter() - t0) * 1000)
        assert served(out), "the queue ran dry"
    return {"submit_ms": submit_ms, "ping_ms": ping_ms}


def concurrent_phase(url: str, password: str, annotators: int, per_annotator: int) -> dict:
    """``annotators`` threads, one gradio_client each, submitting at once."""
    from gradio_client import Client

    results: dict[str, dict] = {}
    clients = {f"a{i + 1}": Client(url, auth=(f"a{i + 1}", password), verbose=False) for i in range(annotators)}
    barrier = threading.Barrier(annotators)

    def annotator(name: str) -> None:
        rec = results[name] = {"served": [], "submitted": [], "ms": [], "error": None}
        try:
            c = clients[name]
            barrier.wait()
            out = c.predict(api_name="/next")
            for _ in range(per_annotator):
                pid = served(out)
                rec["served"].append(pid)
                t0 = time.perf_counter()
                out = c.predict("2", "1", "", False, "bench", None, api_name="/submit")
                rec["ms"].append((time.perf_counter() - t0) * 1000)
                rec["submitted"].append(pid)
        except Exception as err:  # noqa: BLE001 - reported
            rec["error"] = repr(err)

    threads = [threading.Thread(target=annotator, args=(name,)) for name in clients]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"annotators": results, "wall_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------ server side

def build(root: Path, n_prompts: int, password: str, annotators: int):
    from PIL import Image

    from storage import rounds, users
    from storage.workspace import init_workspace

    ws = init_workspace(root)
    cur = ws.cursor()
    rounds.ensure_first_round(cur, base_model="tiny")
    for i in range(N_IMAGES):
        p = ws.lay.images / "bb" / f"bench{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 48), ((i * 37) % 256, (i * 91) % 256, 120)).save(p)
    cur.execute("INSERT INTO images (image_id, path, width, height, format, n_bytes) "
                "SELECT 'bench' || lpad(CAST(i AS VARCHAR), 3, '0'), 'images/bb/bench' || lpad(CAST(i AS VARCHAR), 3, '0') "
                "|| '.png', 64, 48, 'PNG', 200 FROM range(?) t(i)", [N_IMAGES])
    cur.execute("""INSERT INTO prompts (prompt_id, image_id, question, source, split)
                   SELECT 'p' || lpad(CAST(i AS VARCHAR), 7, '0'), 'bench' || lpad(CAST(i % ? AS VARCHAR), 3, '0'),
                          'What is happening in picture ' || i || '? Describe the objects and their colours.',
                          'bench', 'train' FROM range(?) t(i)""", [N_IMAGES, n_prompts])
    cur.execute("""INSERT INTO candidates (candidate_id, prompt_id, round_id, checkpoint_id, text, origin, sample_index)
                   SELECT 'c' || lpad(CAST(i AS VARCHAR), 7, '0') || '_' || k, 'p' || lpad(CAST(i AS VARCHAR), 7, '0'),
                          1, 'c0', 'The picture shows ' || ((i * 7 + k) % 97) || ' apples on a wooden table next to a '
                          || 'red chair; behind them a window lets in the afternoon light. ' || repeat('More detail. ', k),
                          'policy', k FROM range(?) t(i), range(?) s(k)""", [n_prompts, K])
    cur.execute("""INSERT INTO judgments (judgment_id, candidate_id, judge, judge_version, helpfulness, correctness,
                                          coherence, complexity, verbosity, overall, reasoning, status)
                   SELECT 'g_' || candidate_id, candidate_id, 'gemini', 'v1', h % 5, (h // 5) % 5, (h // 25) % 5,
                          (h // 125) % 5, (h // 625) % 5, ((h % 5) + ((h // 5) % 5) + ((h // 25) % 5)) / 12.0,
                          'The answer mentions apples; correctness depends on the image. ' || candidate_id, 'ok'
                   FROM (SELECT candidate_id, abs(hash(candidate_id || 'g')) % 100000 AS h FROM candidates)""")
    cur.execute("""INSERT INTO judgments (judgment_id, candidate_id, judge, judge_version, score, overall, reasoning,
                                          status)
                   SELECT 'k_' || candidate_id, candidate_id, 'critic', 'v1', h % 101, (h % 101) / 100.0,
                          'critic reasoning for ' || candidate_id, 'ok'
                   FROM (SELECT candidate_id, abs(hash(candidate_id || 'k')) % 100000 AS h FROM candidates)""")
    users.add_user(cur, "admin", "admin", password)
    for i in range(annotators + 1):
        users.add_user(cur, f"a{i}", "annotator", password)
    return ws


def proc_mem_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB."""
    vals = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            k, v = line.split(":")
            vals[k] = int(v.split()[0]) / 1024
    return vals.get("VmRSS", 0.0), vals.get("VmHWM", 0.0)


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(ws_root: Path, port: int) -> subprocess.Popen:
    import socket

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "-w", str(ws_root), "--port", str(port)],
                            cwd=repo, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while time.time() - t0 < 300:
        if proc.poll() is not None:
            raise SystemExit(f"prefloop serve exited: {proc.stderr.read()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.2)
    raise SystemExit("prefloop serve did not start")


def server_main(args: argparse.Namespace) -> int:
    import signal
    import socket

    from app.server import AppContext
    from app.server import review as rv
    from storage import review_queue
    from storage.workspace import open_workspace

    password = "bench-password"
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        root = Path(d) / "ws"
        t0 = time.perf_counter()
        ws = build(root, args.prompts, password, args.annotators)
        build_s = time.perf_counter() - t0
        cur = ws.cursor()
        t0 = time.perf_counter()
        n_queued = review_queue.refresh_queue(cur, 1)
        refresh_s = time.perf_counter() - t0
        mem_limit = cur.execute("SELECT current_setting('memory_limit')").fetchone()[0]
        print(f"workspace: {args.prompts:,} prompts x {K} candidates x 2 judges built in {build_s:.1f} s; "
              f"queue ({len(review_queue.QUEUE_ORDERS)} orders) computed in {refresh_s:.1f} s; {n_queued:,} queued; "
              f"DuckDB memory_limit {mem_limit}", flush=True)

        # the handler alone, in this process (the database's owner for now)
        ctx = AppContext(ws)
        handler_ms, view = [], rv.next_item(ctx, "admin", None)
        for _ in range(args.submits):
            t0 = time.perf_counter()
            view = rv.submit(ctx, "admin", view.state, chosen="1", rejected="3")
            handler_ms.append((time.perf_counter() - t0) * 1000)
        print(f"handler alone (in-process: label + claim next + render): p50 {pct(handler_ms, 50):.1f} ms, "
              f"p95 {pct(handler_ms, 95):.1f} ms (n={len(handler_ms)})", flush=True)
        ws.close()

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        t0 = time.perf_counter()
        server = start_server(root, port)
        url = f"http://127.0.0.1:{port}/"
        print(f"`prefloop serve` up in {time.perf_counter() - t0:.1f} s", flush=True)
        try:
            rss0, _ = proc_mem_mb(server.pid)
            lat = latency_phase(url, "a0", password, args.submits)
            sub, ping = lat["submit_ms"], lat["ping_ms"]
            print(f"client submit->next: p50 {pct(sub, 50):.1f} ms, p95 {pct(sub, 95):.1f} ms (n={len(sub)})")
            print(f"client no-op /ping:  p50 {pct(ping, 50):.1f} ms, p95 {pct(ping, 95):.1f} ms")
            print(f"ratio p95 submit / p95 no-op: {pct(sub, 95) / pct(ping, 95):.2f}x "
                  f"(p50: {pct(sub, 50) / pct(ping, 50):.2f}x)", flush=True)
            cpu0 = proc_cpu_s(server.pid)
            conc = concurrent_phase(url, password, args.annotators, args.per_annotator)
            server_cpu = proc_cpu_s(server.pid) - cpu0
            rss1, hwm = proc_mem_mb(server.pid)
            torch_loaded = "torch" in Path(f"/proc/{server.pid}/maps").read_text()
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=120)

        recs = conc["annotators"]
        errors = {k: v["error"] for k, v in recs.items() if v["error"]}
        all_ms = [m for v in recs.values() for m in v["ms"]]
        served_ids = [p for v in recs.values() for p in v["served"]]
        submitted = {(k, p) for k, v in recs.items() for p in v["submitted"]}
        with open_workspace(root, command="bench/label_latency.py") as ws:
            stored = set(map(tuple, ws.cursor().execute(
                "SELECT annotator, prompt_id FROM labels WHERE kind = 'label'").fetchall()))
            per_prompt = ws.cursor().execute(
                "SELECT max(n) FROM (SELECT prompt_id, count(DISTINCT annotator) AS n FROM labels "
                "WHERE kind = 'label' GROUP BY prompt_id)").fetchone()[0]
        lost = submitted - stored
        twice = len(served_ids) - len(set(served_ids))
        print(f"{args.annotators} concurrent annotators: {len(submitted)} submits in {conc['wall_s']:.1f} s "
              f"({len(submitted) / conc['wall_s']:.1f}/s), p50 {pct(all_ms, 50):.1f} ms, p95 {pct(all_ms, 95):.1f} ms; "
              f"lost labels {len(lost)}, prompts served twice {twice}, most annotators on one prompt {per_prompt}, "
              f"errors {len(errors)}; server CPU {1000 * server_cpu / max(1, len(all_ms)):.0f} ms per submit")
        for k, e in errors.items():
            print(f"  {k}: {e}")
        print(f"`prefloop serve` RSS: {rss0:.0f} MB when up, {rss1:.0f} MB after the run (peak {hwm:.0f} MB); "
              f"torch loaded: {torch_loaded}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        ok = not lost and not twice and not errors and per_prompt == 1
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=100_000)
    ap.add_argument("--submits", type=int, default=200)
    ap.add_argument("--annotators", type=int, default=8)
    ap.add_argument("--per-annotator", type=int, default=25)
    ap.add_argument("--dir", default=None, help="parent folder for the temporary workspace")
    return server_main(ap.parse_args())


if __name__ == "__main__":
    sys.exit(main())
