"""prefloop snapshot OUT.duckdb: a consistent copy of the database for notebooks and the duckdb CLI.

The copy is an ordinary DuckDB file: open it with ``duckdb.connect(OUT, read_only=True)`` while the
owner keeps running (DuckDB lets no second process open the live database at all).
"""

from __future__ import annotations

import argparse
import time

from app.commands._ws import workspace_for
from storage import export


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="the snapshot file to write, e.g. snapshot.duckdb")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    with workspace_for(args, "prefloop snapshot") as ws:
        t0 = time.perf_counter()
        out = export.snapshot(ws.cursor(), args.out, force=args.force)
        dt = time.perf_counter() - t0
    print(f"wrote snapshot {out} ({out.stat().st_size / 1e6:.1f} MB) in {dt:.2f} s; "
          f"open it with duckdb.connect({str(out)!r}, read_only=True)")
    return 0
