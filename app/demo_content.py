"""The demo workspace's prompts: real photos shipped in scikit-image, with questions a person would ask,
plus a few easy-vqa prompts with exact reference answers.

Every photo comes from ``skimage.data`` (shipped in the wheel, no download); its licence line is taken
from the function's own docstring and written to ``LICENSES.md`` beside the images.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

# skimage.data function -> questions (counting, reading text, describing, reasoning)
PHOTOS: dict[str, list[str]] = {
    "astronaut": ["What is the person wearing?", "What flag can you see in the picture?"],
    "camera": ["What is the man holding?", "Describe the scene in one sentence."],
    "chelsea": ["What animal is this, and what colour is its fur?", "Does the cat look relaxed or alert?"],
    "clock": ["What time does the clock show?"],
    "coffee": ["What drink is in the cup?", "What is under the cup?"],
    "coins": ["How many coins can you see?", "Are all the coins the same size?"],
    "horse": ["What animal is shown, and what is it doing?"],
    "hubble_deep_field": ["What kind of objects fill this image?", "Roughly how many bright objects stand out?"],
    "immunohistochemistry": ["What kind of image is this: a landscape, a microscope slide or a painting?"],
    "moon": ["Which celestial body is this?", "Describe the surface texture."],
    "page": ["What does the text on the page say?"],
    "retina": ["What part of the body does this medical image show?"],
    "rocket": ["What is happening in this picture?", "Is the rocket on the ground or in the air?"],
    "text": ["What words can you read in this image?"],
    "brick": ["What is this wall made of?"],
    "grass": ["What plant texture is shown here?"],
    "gravel": ["Describe the surface in this picture."],
    "cell": ["What might this grainy image be a picture of?"],
    "microaneurysms": ["Is this a photograph of everyday objects or a medical image?"],
    "stereo_motorcycle": ["What vehicle is in the picture?", "What colour is the motorcycle?"],
}


def _array(name: str) -> np.ndarray:
    import skimage.data

    a = getattr(skimage.data, name)()
    if isinstance(a, tuple):  # stereo_motorcycle -> (left, right, disparity)
        a = a[0]
    return np.asarray(a)


def _licence(name: str) -> str:
    import skimage.data

    doc = getattr(skimage.data, name).__doc__ or ""
    hits = [ln.strip() for ln in doc.splitlines()
            if re.search(r"licen[cs]e|public domain|CC0|CC-BY|CC BY|copyright", ln, re.I)]
    return " ".join(hits) or "see the docstring of skimage.data." + name


def photo(name: str) -> Image.Image:
    a = _array(name)
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        a = (255 * (a.astype(np.float64) - a.min()) / max(float(np.ptp(a)), 1e-9)).astype(np.uint8)
    img = Image.fromarray(a)
    return img.convert("RGB")


def _easy_vqa(n: int) -> list[tuple[str, str, str]]:
    """(image path, question, answer) from easy-vqa's test split, first ``n`` in a fixed order."""
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    return [(paths[image_ids[i]], questions[i], answers[i]) for i in range(min(n, len(questions)))]


def write_demo_import(dest_dir: Path, *, n_easy_vqa: int = 8, heldout_every: int = 5) -> Path:
    """Write the demo images and ``questions.jsonl`` (prefloop import format) into ``dest_dir``.

    Deterministic. Every ``heldout_every``-th easy-vqa prompt is held out (the eval step's set).
    """
    dest = Path(dest_dir)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    rows, licences = [], ["# Image licences", ""]
    for name, questions in PHOTOS.items():
        rel = f"images/{name}.png"
        if not (dest / rel).exists():
            photo(name).save(dest / rel)
        lic = _licence(name)
        licences.append(f"- `{rel}`: skimage.data.{name}: {lic}")
        for j, q in enumerate(questions):
            rows.append({"image": rel, "question": q, "id": f"{name}-{j}", "split": "train",
                         "meta": {"source": f"skimage:{name}", "license": lic}})
    for i, (path, q, a) in enumerate(_easy_vqa(n_easy_vqa)):
        rel = f"images/easyvqa-{Path(path).name}"
        if not (dest / rel).exists():
            Image.open(path).convert("RGB").save(dest / rel)
        rows.append({"image": rel, "question": q + " Answer in one word.", "id": f"easyvqa-{i}",
                     "split": "heldout" if i % heldout_every == 0 else "train", "reference": a,
                     "meta": {"source": "easy-vqa", "license": "MIT (easy-vqa)"}})
    licences.append("- `images/easyvqa-*.png`: easy-vqa (MIT licence), synthetic shapes")
    (dest / "LICENSES.md").write_text("\n".join(licences) + "\n")
    out = dest / "questions.jsonl"
    out.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return out
