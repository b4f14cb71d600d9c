"""The job protocol: a job subprocess talks to its owner in JSON lines on stdout.

Events (one JSON object per line, key ``event``):
  {"event": "progress", "done": 3, "total": 10, "unit": "prompts"}
  {"event": "log", "message": "loaded model in 1.2 s"}
  {"event": "metrics", "step": 1, "loss": 0.69, ...}      (training)
  {"event": "done", "summary": {...}}                      (last line of a clean run)
  {"event": "error", "message": "..."}                     (before a non-zero exit)
Any other stdout line (library noise) is kept as a log line by the owner. A job writes its outputs
atomically (``*.tmp`` then rename) so that a killed job leaves no half-written output file.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

_OUT = sys.stdout


def emit(event: str, **fields: Any) -> None:
    if int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) or 0) != 0 and event != "error":
        return  # only rank 0 speaks for a distributed job
    _OUT.write(json.dumps({"event": event, **fields}, default=str) + "\n")
    _OUT.flush()


def progress(done: int, total: int, unit: str = "items") -> None:
    emit("progress", done=done, total=total, unit=unit)


def log(message: str) -> None:
    emit("log", message=message)


def parse_line(line: str) -> dict:
    """One stdout line -> event dict (non-JSON lines become log events)."""
    line = line.rstrip("\n")
    if line.startswith("{"):
        try:
            obj = json.loads(line)
            if isinstance(obj, dict) and "event" in obj:
                return obj
        except ValueError:
            pass
    return {"event": "log", "message": line}


def write_atomic(path: Path, data: bytes | str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def read_config(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "config.json").read_text())
