"""Import rate of `prefloop import`: bulk (pyarrow + INSERT ... SELECT) against a row-at-a-time baseline.

Makes N JSONL rows over ~200 distinct small PNG images (several questions per image; every 4th row
with 3 candidates and a preference) in a temp folder, then:

1. imports them into a fresh workspace with the real pipeline (plan: read/validate/hash/decode;
   write: staged images into the store + one bulk transaction), and re-imports them (all present);
2. plans the same rows into a second fresh workspace and writes them with a naive baseline: one
   INSERT per row (all inside one transaction, so the baseline is not penalised by commits).

Run from the repo root:  python bench/import_rate.py --rows 10000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from PIL import Image

from app.importer import apply_plan, import_path, plan_import
from storage import prompts as prompts_db
from storage import rounds
from storage.images import IMAGE_SCHEMA
from storage.workspace import init_workspace


def make_input(folder: Path, n_rows: int, n_images: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (folder / "imgs").mkdir(parents=True)
    for i in range(n_images):
        base = rng.integers(0, 255, size=3)
        arr = (base + rng.integers(-40, 40, size=(48, 64, 3))).clip(0, 255).astype("uint8")
        Image.fromarray(arr).save(folder / "imgs" / f"img{i:04d}.png")
    lines = []
    for r in range(n_rows):
        row = {"image": f"imgs/img{r % n_images:04d}.png",
               "question": f"Question {r // n_images}: what is shown in this picture, detail {r}?"}
        if r % 4 == 0:
            row.update(candidates=[f"answer A to {r}", f"answer B to {r}", f"answer C to {r}"], chosen=0, rejected=2)
        lines.append(json.dumps(row))
    path = folder / "questions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def naive_write(cur, plan) -> None:
    """Baseline: the same rows, one INSERT statement per row, in one transaction."""
    tables = [("images", IMAGE_SCHEMA.names, plan.images),
              ("prompts", prompts_db.PROMPT_SCHEMA.names, plan.prompts),
              ("candidates", prompts_db.CANDIDATE_SCHEMA.names, plan.candidates),
              ("labels", prompts_db.LABEL_SCHEMA.names, plan.labels)]
    plan.stager.publish({row["path"] for row in plan.images})
    cur.execute("BEGIN TRANSACTION")
    for table, cols, rows in tables:
        sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        defaults = {"view": "original", "kind": "label", "all_bad": False, "sample_index": 0}
        for row in rows:
            vals = [row.get(c, defaults.get(c)) for c in cols]
            vals = [json.dumps(v) if isinstance(v, dict) else v for v in vals]
            cur.execute(sql, vals)
    cur.execute("COMMIT")


def fresh_workspace(path: Path):
    ws = init_workspace(path)
    rounds.ensure_first_round(ws.cursor(), base_model="tiny")
    return ws


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--images", type=int, default=200)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="prefloop-bench-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        src = make_input(tmp / "input", args.rows, args.images)
        print(f"made {args.rows} rows over {args.images} images in {time.perf_counter() - t:.1f} s")

        with fresh_workspace(tmp / "ws_bulk") as ws:
            prompts_db.existing_prompt_ids(ws.cursor(), ["warm-up"])  # first pyarrow->DuckDB use imports pandas
            t0 = time.perf_counter()
            plan = plan_import(ws, src.parent, progress=False)
            t1 = time.perf_counter()
            res = apply_plan(ws, plan)
            t2 = time.perf_counter()
            again = import_path(ws, src.parent, progress=False)
            bulk_counts = rounds.table_counts(ws.cursor())
        bulk_plan, bulk_write = t1 - t0, t2 - t1

        with fresh_workspace(tmp / "ws_naive") as ws:
            prompts_db.existing_prompt_ids(ws.cursor(), ["warm-up"])
            t0 = time.perf_counter()
            plan = plan_import(ws, src.parent, progress=False)
            t1 = time.perf_counter()
            naive_write(ws.cursor(), plan)
            t2 = time.perf_counter()
            naive_counts = rounds.table_counts(ws.cursor())
        naive_plan, naive_write_s = t1 - t0, t2 - t1

    assert bulk_counts == naive_counts, (bulk_counts, naive_counts)
    n = args.rows
    print(f"rows {n}: {res.new_prompts} prompts, {res.images_stored} images, {res.candidates} candidates, "
          f"{res.preferences} preferences")
    print(f"bulk   : plan {bulk_plan:6.2f} s + write {bulk_write:6.2f} s = {bulk_plan + bulk_write:6.2f} s "
          f"-> {n / (bulk_plan + bulk_write):8,.0f} rows/s (write phase {n / bulk_write:,.0f} rows/s)")
    print(f"naive  : plan {naive_plan:6.2f} s + write {naive_write_s:6.2f} s = {naive_plan + naive_write_s:6.2f} s "
          f"-> {n / (naive_plan + naive_write_s):8,.0f} rows/s (write phase {n / naive_write_s:,.0f} rows/s)")
    print(f"re-import (all present): {again.seconds:.2f} s -> {again.rate:,.0f} rows/s; {again.summary()}")
    print(f"ratio  : write phase {naive_write_s / bulk_write:.1f}x faster, end to end "
          f"{(naive_plan + naive_write_s) / (bulk_plan + bulk_write):.1f}x faster")


if __name__ == "__main__":
    main()
