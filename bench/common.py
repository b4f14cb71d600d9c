"""Shared bench helpers: repo on sys.path, offline environment, base model folders, real photos, tables."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# skimage.data photos (CC0 / public domain) with what a fluent, correct answer says about each
PHOTOS = {
    "astronaut": "An astronaut in a white spacesuit smiles in front of an American flag.",
    "chelsea": "A tabby cat with green eyes looks to the side.",
    "coffee": "A cup of coffee with latte art sits on a saucer with a spoon.",
    "rocket": "A rocket stands on the launch pad under a clear sky.",
    "camera": "A man with a camera on a tripod stands in a field.",
    "coins": "Many old coins of different sizes lie on a dark surface.",
    "horse": "The silhouette of a horse galloping, black on white.",
    "clock": "A wall clock with a round face and black hands.",
}
WRONG = ["A red sports car is parked on a busy street at night.", "Two dogs are playing with a ball on the beach.",
         "A bowl of fruit with apples and bananas is on the table.", "A sailboat floats on a calm blue lake."]


def base_model(name: str, dest: Path) -> Path:
    """The loadable folder of a built-in model (``tiny`` is built, ``demo`` linked from the shared cache)."""
    from backend.models import materialize

    return materialize(name, Path(dest))


def photo_files(dest: Path) -> dict[str, Path]:
    """The skimage photos saved as PNG files in ``dest``: name -> path."""
    from PIL import Image
    from skimage import data

    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in PHOTOS:
        path = dest / f"{name}.png"
        if not path.is_file():
            Image.fromarray(getattr(data, name)()).convert("RGB").save(path)
        out[name] = path
    return out


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
