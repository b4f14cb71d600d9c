"""Render job events on the terminal: a tqdm bar for progress, one line per training log step."""

from __future__ import annotations

import sys

from tqdm import tqdm


class TerminalEvents:
    """An ``on_event`` handler for backend jobs; use as a context manager so the bar closes."""

    def __init__(self, desc: str, verbose: bool = False, quiet: bool = False):
        self.desc = desc
        self.verbose = verbose
        self.quiet = quiet
        self.bar: tqdm | None = None

    def __call__(self, ev: dict) -> None:
        kind = ev.get("event")
        if self.quiet:
            return
        if kind == "progress":
            total = ev.get("total") or 0
            if self.bar is None:
                self.bar = tqdm(total=total, desc=self.desc, unit=ev.get("unit", "it"), file=sys.stderr,
                                dynamic_ncols=True, disable=None)
            self.bar.total = total
            self.bar.n = ev.get("done", 0)
            self.bar.refresh()
        elif kind == "metrics":
            parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in ev.items()
                     if k in ("step", "loss", "margin", "accuracy", "lr") and v is not None]
            self._write("  " + "  ".join(parts))
        elif kind == "log" and self.verbose:
            self._write(f"  {ev.get('message', '')}")
        elif kind == "error":
            self._write(f"  job error: {ev.get('message', '')}")

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def __enter__(self) -> TerminalEvents:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
