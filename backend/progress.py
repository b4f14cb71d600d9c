"""The job protocol: a job subprocess talks to its owner in JSON lines on stdout.

Events (one JSON object per line, key ``event``):
  {"event": "progress", "done": 3, "total": 10, "unit": "prompts"}
  {"event": "log", "message": "loaded model in 1.2 s"}
  {"event": "metrics", "step": 1, "loss": 0.69, ...}      (training)
  {"event": "done", "summary": {...}}                      (last line of a clean run)
  {"event": "error", "message": "..."}                     (before a non-zero exit)
Any other stdout line (library noise) is kept as a log line by the owner. A job writes its outputs
atomically (``*.tmp`` then rename) so that a killed job leaves no half-written output file.
Across hosts (the deepspeed launcher with a hostfile runs its ranks through pdsh) every line arrives
prefixed with ``host: ``; ``parse_host_line`` reads those.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

_OUT = sys.stdout


def emit(event: str, **fields: Any) -> None:
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) != 0 and event != "error":
        return  # only (global) rank 0 speaks for a distributed job; every rank reports its error
    _OUT.write(json.dumps({"event": event, **fields}, default=str) + "\n")
    _OUT.flush()


def progress(done: int, total: int, unit: str = "items") -> None:
    emit("progress", done=done, total=total, unit=unit)


def log(message: str) -> None:
    emit("log", message=message)


def _event(line: str) -> dict | None:
    """The event of a protocol line, None for anything else."""
    if line.startswith("{"):
        try:
            obj = json.loads(line)
        except ValueError:
            return None
        if isinstance(obj, dict) and "event" in obj:
            return obj
    return None


def parse_line(line: str) -> dict:
    """One stdout line -> event dict (non-JSON lines become log events)."""
    line = line.rstrip("\n")
    return _event(line) or {"event": "log", "message": line}


_HOST_PREFIX = re.compile(r"([^\s:]+): (.*)")
"""pdsh's ``host: `` in front of each line a remote host prints."""


def parse_host_line(line: str, main_host: str | None = None) -> dict:
    """``parse_line`` for output that came through pdsh. A ``host: `` prefix is stripped only when the rest
    is one of our events: from ``main_host`` (where rank 0 runs; None: any host) it is that event; from
    another host an error stays an error (its message prefixed with the host) and anything else becomes a
    log line; a line whose rest is not an event (noise) is an ordinary log line, prefix kept."""
    line = line.rstrip("\n")
    match = _HOST_PREFIX.fullmatch(line)
    event = _event(match.group(2)) if match else None
    if event is None:
        return parse_line(line)
    host = match.group(1)
    if main_host is None or host == main_host:
        return event
    if event["event"] == "error":
        return {**event, "message": f"{host}: {event.get('message', '')}"}
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
