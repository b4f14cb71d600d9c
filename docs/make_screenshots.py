"""Regenerate docs/review.png and docs/rounds.png from the browser tests (real app, real Chromium).

    python docs/make_screenshots.py

Runs tests/test_browser.py with PREFLOOP_SCREENSHOTS pointing here: the keyboard-labelling test saves the
review screen (a decision in progress after an undo), the round test saves the Rounds tab after a round on
`tiny` finished (progress, log, pairs by source, training curves). Needs /usr/bin/chromium.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent

if __name__ == "__main__":
    env = {**os.environ, "PREFLOOP_SCREENSHOTS": str(DOCS), "GRADIO_ANALYTICS_ENABLED": "False"}
    sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", "tests/test_browser.py"], cwd=DOCS.parent, env=env))
