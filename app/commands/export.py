"""prefloop export: read-only SQL results (parquet/jsonl/csv) or the preference pairs (TRL / LLaVA).

  prefloop export -w WS --sql "SELECT ..." --out FILE [--format parquet|jsonl|csv] [--limit N] [--timeout S]
  prefloop export -w WS --pairs [--round N] --out FILE [--format parquet|jsonl|llava] [--embed-images]

The format defaults from the file suffix (.parquet, .jsonl, .csv, .json -> llava).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from app.commands._ws import actor, workspace_for
from core.errors import UsageError
from storage import audit, export

SUFFIX_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".json": "llava"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--sql", help="one read-only SELECT over the workspace tables")
    what.add_argument("--pairs", action="store_true", help="export chosen/rejected pairs (TRL vision format)")
    p.add_argument("--out", required=True, help="output file (written to a temp name, then renamed)")
    p.add_argument("--format", choices=sorted(set(export.QUERY_FORMATS) | set(export.PAIR_FORMATS)),
                   help="output format (default: from the --out suffix, else parquet)")
    p.add_argument("--limit", type=int, help="--sql: write at most N rows (default: all)")
    p.add_argument("--timeout", type=float, default=export.DEFAULT_EXPORT_TIMEOUT_S,
                   help=f"--sql: stop the query after S seconds (default: {export.DEFAULT_EXPORT_TIMEOUT_S:g})")
    p.add_argument("--round", type=int, help="--pairs: only this round (default: all rounds)")
    p.add_argument("--embed-images", action="store_true",
                   help="--pairs --format parquet: store image bytes in the file instead of paths")


def _format(args: argparse.Namespace, registry: dict) -> str:
    fmt = args.format or SUFFIX_FORMATS.get(Path(args.out).suffix.lower(), "parquet")
    if fmt not in registry:
        kind = "--pairs" if args.pairs else "--sql"
        raise UsageError(f"format {fmt!r} is not available with {kind}; choose one of: {', '.join(registry)}")
    return fmt


def run(args: argparse.Namespace) -> int:
    if args.pairs and args.limit is not None:
        raise UsageError("--limit applies to --sql exports only")
    if args.sql is not None and (args.round is not None or args.embed_images):
        raise UsageError("--round and --embed-images apply to --pairs exports only")
    fmt = _format(args, export.PAIR_FORMATS if args.pairs else export.QUERY_FORMATS)
    with workspace_for(args, "prefloop export") as ws:
        cur = ws.cursor()
        t0 = time.perf_counter()
        if args.pairs:
            n = export.export_pairs(cur, ws.root, args.out, fmt, round_id=args.round, embed_images=args.embed_images)
        else:
            n = export.export_query(cur, args.sql, args.out, fmt, timeout_s=args.timeout or None, limit=args.limit)
        dt = time.perf_counter() - t0
        audit.record(cur, actor(), "export", {"pairs": bool(args.pairs), "round": args.round, "sql": args.sql,
                                              "format": fmt, "out": str(args.out), "rows": n})
    what = "pairs" if args.pairs else "rows"
    print(f"wrote {n} {what} to {args.out} ({fmt}) in {dt:.2f} s ({n / max(dt, 1e-9):,.0f} {what}/s)")
    return 0
