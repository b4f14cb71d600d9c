"""What every job script does the same way: read an input Parquet the owner wrote, and end ``main``.

A job reports a failure as ONE ``error`` event on stdout that the owner can show (its traceback goes
to stderr, kept in the run folder), and exits 1.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from backend import progress
from core.errors import PrefloopError, UsageError


def read_input(path: Path, columns: Sequence[str], error: type[PrefloopError] = UsageError) -> list[dict]:
    """The rows of an input Parquet (only ``columns``); ``error`` names the file and what is missing."""
    import pyarrow.parquet as pq

    if not path.is_file():
        raise error(f"{path.parent} has no {path.name}; the owner writes it before starting the job")
    table = pq.read_table(path)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise error(f"{path} lacks column(s) {', '.join(missing)} (needs {', '.join(columns)})")
    return table.select(list(columns)).to_pylist()


def check_run_dir(run_dir: Path, host: str | None = None) -> None:
    """Every rank's first step: this host (``host``, default its hostname) sees the run folder the owner wrote,
    i.e. can read its ``config.json``. On another node that fails when the workspace is not on a filesystem
    every node mounts at the same path; the error says so."""
    if not os.access(Path(run_dir) / "config.json", os.R_OK):
        raise UsageError(f"the workspace must be on a filesystem every node mounts at the same path: {run_dir} "
                         f"is not visible on {host or socket.gethostname()}")


def run_main(main: Callable[[list[str]], int], what: str) -> None:
    """``if __name__ == "__main__"`` of a job: run ``main(argv)`` and exit with its code, or with 1 and
    one error event (``what`` failed: the exception) when it raises."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    try:
        sys.exit(main(sys.argv[1:]))
    except PrefloopError as err:
        progress.emit("error", message=str(err))
        sys.exit(1)
    except Exception as err:  # noqa: BLE001 - the owner must get one line it can show
        traceback.print_exc(file=sys.stderr)
        progress.emit("error", message=f"{what} failed: {type(err).__name__}: {err} (traceback on stderr)")
        sys.exit(1)
