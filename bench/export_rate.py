"""Export rate: ``storage.export.export_query`` vs what one would write without it.

Builds a temp workspace with 1,000,000 candidate rows (generated in SQL), then times, on the same rows:
  parquet  ours: guarded ``COPY (SELECT ...) TO`` (DuckDB streams, zstd)
           baseline: ``cur.execute(sql).fetchdf()`` then ``DataFrame.to_parquet`` (pandas + pyarrow)
  jsonl    ours: guarded ``COPY ... (FORMAT json)``
           baseline: ``fetchall()`` and a Python loop of ``json.dumps`` per row
Each result is checked (row count read back) so a fast but wrong export cannot win.

    python bench/export_rate.py [--rows N]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import tempfile
import time

import pyarrow.parquet as pq

from storage.export import export_query
from storage.workspace import init_workspace

SQL = "SELECT * FROM candidates"


def build(ws, n_rows: int, n_prompts: int = 10_000) -> None:
    cur = ws.cursor()
    cur.execute("INSERT INTO images (image_id, path, width, height, format, n_bytes) "
                "SELECT 'img' || i, 'images/' || i || '.png', 64, 64, 'PNG', 1000 FROM range(1000) t(i)")
    cur.execute("INSERT INTO prompts (prompt_id, image_id, question, source, split) "
                "SELECT 'p' || i, 'img' || (i % 1000), 'What is shown in picture ' || i || '?', 'bench', 'train' "
                "FROM range(?) t(i)", [n_prompts])
    cur.execute("""INSERT INTO candidates (candidate_id, prompt_id, round_id, checkpoint_id, text, origin, sampling,
                                           model, engine, seed, sample_index)
                   SELECT 'c' || i, 'p' || (i % ?), 1, 'c0',
                          'The picture shows ' || (i % 97) || ' apples on a table next to a red chair, answer ' || i,
                          'policy', '{"temperature": 0.7, "top_p": 0.9}', 'tiny', 'hf', i, i % 5
                   FROM range(?) t(i)""", [n_prompts, n_rows])


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def baseline_parquet(cur, path: Path) -> int:
    df = cur.execute(SQL).fetchdf()
    df.to_parquet(path)
    return len(df)


def baseline_jsonl(cur, path: Path) -> int:
    rel = cur.execute(SQL)
    cols = [d[0] for d in rel.description]
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rel.fetchall():
            f.write(json.dumps(dict(zip(cols, row)), default=str) + "\n")
            n += 1
    return n


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        ws = init_workspace(d / "ws", command="bench")
        try:
            t_build, _ = timed(lambda: build(ws, args.rows))
            cur = ws.cursor()
            n = cur.execute("SELECT count(*) FROM candidates").fetchone()[0]
            print(f"built {n:,} candidate rows in {t_build:.1f} s")
            results = {
                "parquet": (lambda p: export_query(cur, SQL, p, "parquet"), baseline_parquet,
                            lambda p: pq.ParquetFile(p).metadata.num_rows,
                            "pandas fetchdf() + DataFrame.to_parquet"),
                "jsonl": (lambda p: export_query(cur, SQL, p, "jsonl"), baseline_jsonl, count_lines,
                          "fetchall() + json.dumps per row"),
            }
            for fmt, (ours, base, check, base_name) in results.items():
                t_ours, n_ours = timed(lambda ours=ours, p=d / f"ours.{fmt}": ours(p))
                t_base, n_base = timed(lambda base=base, p=d / f"base.{fmt}": base(cur, p))
                assert n_ours == n_base == n == check(d / f"ours.{fmt}") == check(d / f"base.{fmt}"), fmt
                size = (d / f"ours.{fmt}").stat().st_size / 1e6
                print(f"{fmt:8s} export_query  {t_ours:6.2f} s  {n / t_ours:12,.0f} rows/s  ({size:.0f} MB)")
                print(f"{fmt:8s} baseline      {t_base:6.2f} s  {n / t_base:12,.0f} rows/s  ({base_name})")
                print(f"{fmt:8s} speed-up      {t_base / t_ours:6.1f}x")
        finally:
            ws.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
