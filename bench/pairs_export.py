"""Pair building + Parquet export at 1M candidates: our code path vs a pandas loop over the same rows.

Builds a temp workspace with N prompts x k candidates (default 200,000 x 5 = 1,000,000) and one judge's
scores for every candidate, all generated in SQL from range(), plus one real PNG per image id. Then:

  ours      backend.steps.pairs.build_round_pairs("best-worst") (the pairs step: in DuckDB, storage.pair_sql) ->
            storage.pairs.replace_draft_pairs -> storage.export.export_pairs (TRL Parquet, written by DuckDB)
  baseline  one query of the same candidates and scores into a DataFrame, sorted by prompt and grouped
            (itertools.groupby over itertuples), best and worst picked in Python per group with the same
            tie rule as best-worst, TRL rows built with the same helper, DataFrame.to_parquet

Both must give the same set of (prompt, chosen, rejected) pairs and the same number of Parquet rows,
so a fast but wrong path cannot win. Prints each phase, both totals and the ratio, and a last line
``RESULT {...}`` (JSON) for bench/run_all.py.

    python bench/pairs_export.py [--prompts 200000] [--k 5]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import io
import itertools
import json
import operator
import tempfile
import time

import pyarrow.parquet as pq

from backend.pairs import PairOptions
from backend.steps.pairs import build_round_pairs
from core.trl_format import trl_row
from storage import pairs as pairstore
from storage import rounds
from storage.export import export_pairs
from storage.workspace import init_workspace

JUDGE = "gemini"
N_IMAGES = 1000


def build(ws, n_prompts: int, k: int) -> None:
    from PIL import Image

    cur = ws.cursor()
    rounds.ensure_first_round(cur, base_model="tiny")
    for i in range(N_IMAGES):  # real files: the export checks every image path
        path = ws.root / "images" / f"{i % 100:02d}" / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (i % 255, 100, 200)).save(buf, format="PNG")
        path.write_bytes(buf.getvalue())
    cur.execute("INSERT INTO images (image_id, path, width, height, format, n_bytes) "
                "SELECT 'img' || i, 'images/' || lpad(CAST(i % 100 AS VARCHAR), 2, '0') || '/img' || i || '.png', "
                "8, 8, 'PNG', 100 FROM range(?) t(i)", [N_IMAGES])
    cur.execute("INSERT INTO prompts (prompt_id, image_id, question, source, split) "
                "SELECT 'p' || i, 'img' || (i % ?), 'What is shown in picture ' || i || '?', 'bench', 'train' "
                "FROM range(?) t(i)", [N_IMAGES, n_prompts])
    cur.execute("""INSERT INTO candidates (candidate_id, prompt_id, round_id, checkpoint_id, text, origin, view,
                                           sampling, model, engine, seed, sample_index)
                   SELECT 'c' || i, 'p' || (i // ?), 1, 'c0',
                          'The picture shows ' || (i % 97) || ' apples on a table next to a red chair, answer ' || i,
                          'policy', 'original', '{"temperature": 0.7, "top_p": 0.9}', 'tiny', 'hf', i, i % ?
                   FROM range(?) t(i)""", [k, k, n_prompts * k])
    # five 0-4 metrics from a hash of the id; overall = their mean / 4 (ties happen, as with real judges)
    cur.execute("""INSERT INTO judgments (judgment_id, candidate_id, judge, judge_version, helpfulness, correctness,
                                          coherence, complexity, verbosity, overall, status)
                   SELECT 'j' || i, 'c' || i, ?, 'v1', h % 5, (h // 5) % 5, (h // 25) % 5, (h // 125) % 5,
                          (h // 625) % 5,
                          ((h % 5) + ((h // 5) % 5) + ((h // 25) % 5) + ((h // 125) % 5) + ((h // 625) % 5)) / 20.0,
                          'ok'
                   FROM (SELECT i, hash(i) % 3125 AS h FROM range(?) t(i))""", [JUDGE, n_prompts * k])


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def ours(ws, out: Path) -> tuple[dict, set, int]:
    cur = ws.cursor()
    phases = {}
    phases["build"], built = timed(lambda: build_round_pairs(cur, 1, "best-worst", PairOptions(judge=JUDGE)))
    assert built.path == "sql", "best-worst has a SQL path"
    phases["store"], _ = timed(lambda: pairstore.replace_draft_pairs(cur, 1, built.table))
    phases["export"], n = timed(lambda: export_pairs(cur, ws.root, out, "parquet", round_id=1))
    cols = [built.table.column(c).to_pylist() for c in ("prompt_id", "chosen_id", "rejected_id")]
    return phases, set(zip(*cols)), n


BASELINE_SQL = """
    SELECT c.prompt_id, c.candidate_id, c.text, j.overall, pr.question, i.path AS image_path
    FROM candidates c
    JOIN judgments j ON j.candidate_id = c.candidate_id AND j.judge = ? AND j.status = 'ok'
    JOIN prompts pr ON pr.prompt_id = c.prompt_id
    JOIN images i ON i.image_id = pr.image_id
    WHERE c.round_id = 1 AND c.origin IN ('policy', 'imported') AND pr.split = 'train'
"""


def baseline(ws, out: Path) -> tuple[dict, set, int]:
    import pandas as pd

    cur = ws.cursor()
    root = ws.root.resolve()
    phases = {}
    phases["read"], df = timed(lambda: cur.execute(BASELINE_SQL, [JUDGE]).fetchdf())

    def loop():
        rows, got = [], set()
        ordered = df.sort_values("prompt_id", kind="stable")
        for pid, group in itertools.groupby(ordered.itertuples(index=False), key=operator.attrgetter("prompt_id")):
            group = list(group)
            if len(group) < 2:
                continue
            # best-worst's rule: highest score (smallest id on a tie) vs lowest (largest id on a tie)
            group.sort(key=lambda c: (-c.overall, c.candidate_id))
            best, worst = group[0], group[-1]
            if best.overall == worst.overall:
                continue
            got.add((pid, best.candidate_id, worst.candidate_id))
            rows.append({**trl_row({"bytes": None, "path": str(root / best.image_path)}, best.question, best.text,
                                   worst.text),
                         "round_id": 1, "prompt_id": pid, "chosen_id": best.candidate_id,
                         "rejected_id": worst.candidate_id, "source": JUDGE, "strategy": "best-worst",
                         "margin": float(best.overall - worst.overall)})
        return rows, got

    phases["groupby loop"], (rows, got) = timed(loop)
    phases["to_parquet"], _ = timed(lambda: pd.DataFrame(rows).to_parquet(out))
    return phases, got, len(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=200_000)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--dir", default=None, help="parent folder for the temporary workspace")
    args = ap.parse_args()
    n_cand = args.prompts * args.k
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        ws = init_workspace(tmp / "ws")
        t_build, _ = timed(lambda: build(ws, args.prompts, args.k))
        print(f"built {args.prompts:,} prompts x {args.k} = {n_cand:,} candidates with {JUDGE} scores "
              f"in {t_build:.1f} s")
        ph_o, pairs_o, n_o = ours(ws, tmp / "ours.parquet")
        ph_b, pairs_b, n_b = baseline(ws, tmp / "baseline.parquet")
        assert pairs_o == pairs_b, f"the two paths disagree on {len(pairs_o ^ pairs_b)} pairs"
        assert n_o == n_b == len(pairs_o) == pq.read_metadata(tmp / "ours.parquet").num_rows
        size_o = (tmp / "ours.parquet").stat().st_size / 1e6
        size_b = (tmp / "baseline.parquet").stat().st_size / 1e6
        ws.close()
    t_o, t_b = sum(ph_o.values()), sum(ph_b.values())
    print(f"pairs: {n_o:,} (best-worst; {args.prompts - n_o:,} prompts skipped as ties)")
    print("ours     " + ", ".join(f"{k} {v:.2f} s" for k, v in ph_o.items())
          + f" = {t_o:.2f} s  {n_cand / t_o:,.0f} candidates/s  ({size_o:.1f} MB)")
    print("baseline " + ", ".join(f"{k} {v:.2f} s" for k, v in ph_b.items())
          + f" = {t_b:.2f} s  {n_cand / t_b:,.0f} candidates/s  ({size_b:.1f} MB, pandas + a Python loop)")
    print(f"ratio    baseline / ours: {t_b / t_o:.2f}x")
    print("RESULT " + json.dumps({
        "bench": "pairs_export", "candidates": n_cand, "pairs": n_o,
        "ours_s": round(t_o, 2), "baseline_s": round(t_b, 2), "ratio_baseline_over_ours": round(t_b / t_o, 2),
        "ours_phases_s": {k: round(v, 2) for k, v in ph_o.items()},
        "baseline_phases_s": {k: round(v, 2) for k, v in ph_b.items()},
        "baseline": "pandas: one query into a DataFrame, grouped by prompt, best/worst picked in Python, to_parquet"}))


if __name__ == "__main__":
    main()
