"""prefloop import -w WS FILE: prompts from JSONL, a folder with questions.jsonl, Parquet or a datasets folder.

Rows: {"image", "question" (or "prompt"), "id"?, "split"?, "meta"?, "reference"?, "candidates"?,
"chosen"?, "rejected"?}. See app/import_sources.py for every accepted input and column form.
"""

from __future__ import annotations

import argparse
import sys

from app.commands._ws import actor, workspace_for
from app.importer import import_path
from core.errors import ImportRejected
from storage import audit
from storage.images import DEFAULT_MAX_MEGAPIXELS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="FILE",
                   help="a .jsonl file, a folder with questions.jsonl, a .parquet file, or a datasets "
                        "save_to_disk folder")
    p.add_argument("--split", choices=("train", "heldout"), default="train",
                   help="split of rows that do not name one (default: train)")
    p.add_argument("--source", default=None, help="source label stored on each prompt (default: the file name)")
    p.add_argument("--skip-bad", action="store_true",
                   help="import the good rows and write the bad ones to a reject report "
                        "(default: any bad row rejects the whole import)")
    p.add_argument("--reject-report", metavar="PATH", default=None,
                   help="where to write the reject report (default: <input>.rejects.jsonl beside the input)")
    p.add_argument("--allow-outside", action="store_true",
                   help="allow image paths and symlinks that resolve outside the input's folder")
    p.add_argument("--max-megapixels", type=float, default=DEFAULT_MAX_MEGAPIXELS,
                   help=f"refuse images larger than this (decompression bombs; default: {DEFAULT_MAX_MEGAPIXELS:g})")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    with workspace_for(args, "prefloop import") as ws:
        try:
            result = import_path(ws, args.input, skip_bad=args.skip_bad, allow_outside=args.allow_outside,
                                 max_megapixels=args.max_megapixels, default_split=args.split,
                                 source=args.source, progress=not args.quiet, reject_report=args.reject_report)
        except ImportRejected as err:
            for problem in err.problems:
                print(problem, file=sys.stderr)
            raise
        audit.record(ws.cursor(), actor(), "import", {"file": str(args.input), "new_prompts": result.new_prompts,
                                                      "candidates": result.candidates, "bad_rows": result.bad_rows})
    print(result.summary())
    if result.reject_report:
        print(f"{result.bad_rows} bad rows written to {result.reject_report}", file=sys.stderr)
    return 0
