"""The demo workspace's prompts: real photos shipped in scikit-image, with questions a person would ask,
plus a few easy-vqa prompts with exact reference answers.

Every image comes from an installed wheel, never a download: ``skimage.data`` (only the files shipped in
the scikit-image wheel; several of its datasets need ``pooch`` and the network, and are not used) and
``easy_vqa`` (MIT). Each image's licence, as its own docstring states it, is written to ``LICENSES.md``
beside the images and into each prompt's ``meta``.

``write_demo_import(dest)`` writes ``images/*.png`` + ``questions.jsonl`` (the ``prefloop import``
format) + ``LICENSES.md``; the output is the same on every run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from core.errors import UsageError

log = logging.getLogger(__name__)

MAX_SIDE = 1024
"""Longer photos are scaled down to this many pixels (the review screen never needs more)."""
EASY_VQA_SUFFIX = " Answer in one word."
EASY_VQA_LICENSE = "MIT (easy-vqa, Copyright (c) 2019 Victor Zhou); synthetic shapes"
_WHEEL = "distributed in the scikit-image wheel (BSD-3-Clause)"


@dataclass(frozen=True)
class DemoImage:
    """One image: how to get it from skimage.data, what it is, its licence, and questions about it."""

    loader: str
    """``skimage.data`` function; ``name[i]`` takes item i of a function that returns a tuple."""
    kind: str
    """``photo`` (a real photograph) or ``drawing`` (clip art, a synthetic figure)."""
    license: str
    questions: tuple[str, ...]
    reference: dict[int, str] | None = None
    """Exact answers for some questions (question index -> answer), for the ``reference`` judge."""


# Order matters: `prefloop demo --prompts N` keeps the first N rows, so the liveliest photos come first.
IMAGES: dict[str, DemoImage] = {
    "astronaut": DemoImage(
        "astronaut", "photo", "public domain (NASA: no known copyright restrictions, released into the public domain)",
        ("What is the person wearing?", "What flag can you see in the picture?",
         "What is standing on the table behind her?")),
    "coffee": DemoImage(
        "coffee", "photo", "CC0 (photographer Rachel Michetti, courtesy of Pikolo Espresso Bar)",
        ("What drink is in the cup?", "What is under the cup?", "What is the table made of?")),
    "chelsea": DemoImage(
        "chelsea", "photo", "CC0 (photographer Stefan van der Walt)",
        ("What animal is this, and what colour is its fur?", "Does the cat look relaxed or alert?")),
    "camera": DemoImage(
        "camera", "photo", "CC0 (photographer Lav Varshney)",
        ("What is the man holding?", "Describe the scene in one sentence.", "Is this photo in colour?")),
    "coins": DemoImage(
        "coins", "photo", "no known copyright restrictions (Brooklyn Museum collection)",
        ("How many coins can you see?", "Are all the coins the same size?",
         "How are the coins arranged?")),
    "rocket": DemoImage(
        "rocket", "photo", "public domain (SpaceX launch photo of DSCOVR on Falcon 9, released into the public domain)",
        ("What is happening in this picture?", "Is it day or night?",
         "What are the tall towers around the rocket for?")),
    "page": DemoImage(
        "page", "photo", f"no licence stated in its docstring; {_WHEEL}",
        ("What is the heading at the top of the page?", "What does the text on the page say?"),
        reference={0: "Region-based segmentation"}),
    "stereo_motorcycle": DemoImage(
        "stereo_motorcycle[0]", "photo",
        "Middlebury 2014 stereo benchmark (Scharstein et al., GCPR 2014), left view; no licence stated in its "
        f"docstring; {_WHEEL}",
        ("What vehicle is in the picture?", "What colour is the motorcycle?")),
    "motorcycle_right": DemoImage(
        "stereo_motorcycle[1]", "photo",
        "Middlebury 2014 stereo benchmark (Scharstein et al., GCPR 2014), right view of the same scene; no licence "
        f"stated in its docstring; {_WHEEL}",
        ("What is stored on the shelves behind the motorcycle?", "Is the motorcycle's kickstand down?")),
    "clock": DemoImage(
        "clock", "photo", "public domain (released by the photographer, Stefan van der Walt)",
        ("What time does the clock show?", "Why is it hard to read this clock?")),
    "text": DemoImage(
        "text", "photo", "public domain (Wikipedia File:Corner.png: no known copyright restrictions)",
        ("What is written on this paper?", "Is the writing typed or handwritten?")),
    "hubble_deep_field": DemoImage(
        "hubble_deep_field", "photo", "public domain (NASA / HubbleSite)",
        ("What kind of objects fill this image?", "Roughly how many bright objects stand out?")),
    "moon": DemoImage(
        "moon", "photo", f"no licence stated in its docstring; {_WHEEL}",
        ("Which celestial body is this?", "Describe the surface texture.")),
    "retina": DemoImage(
        "retina", "photo", "CC0 1.0 (Mikael Häggström, Wikimedia Commons: Fundus photograph of normal left eye)",
        ("What part of the body does this medical image show?", "What are the dark red lines?")),
    "immunohistochemistry": DemoImage(
        "immunohistochemistry", "photo", "no known copyright restrictions (CMMI)",
        ("What kind of image is this: a landscape, a microscope slide or a painting?",
         "What colours is the tissue stained with?")),
    "microaneurysms": DemoImage(
        "microaneurysms", "photo", "CC0 (Andreas Maier, High-Resolution Fundus Image Database)",
        ("Is this a photograph of everyday objects or a medical image?",)),
    "cell": DemoImage(
        "cell", "photo", "CC0 (quantitative phase image, Müller et al. 2018)",
        ("What might this grainy image be a picture of?", "How many round objects can you see?")),
    "brick": DemoImage(
        "brick", "photo", "CC0 (CC0Textures, Bricks25)",
        ("What is this wall made of?", "In which direction do the bricks run?")),
    "grass": DemoImage(
        "grass", "photo", "CC0 (DeviantArt, linolafett, Grass-01)",
        ("What plant texture is shown here?",)),
    "gravel": DemoImage(
        "gravel", "photo", "CC0 (CC0Textures, Gravel04)",
        ("Describe the surface in this picture.", "Would this ground be comfortable to walk on barefoot?")),
    "horse": DemoImage(
        "horse", "drawing", "CC0 (Andreas Preuss (marauder), openclipart)",
        ("What animal is shown, and what is it doing?", "Is this a photograph or a silhouette?")),
    "colorwheel": DemoImage(
        "colorwheel", "drawing", f"no licence stated in its docstring; {_WHEEL}",
        ("Which colours can you see?", "What colour is at the centre?")),
}

PHOTOS: dict[str, list[str]] = {name: list(img.questions) for name, img in IMAGES.items() if img.kind == "photo"}
"""The real photographs: name -> questions."""


def image_array(loader: str) -> np.ndarray:
    import skimage.data

    name, _, index = loader.partition("[")
    a = getattr(skimage.data, name)()
    if index:
        a = a[int(index.rstrip("]"))]
    return np.asarray(a)


def image(name: str) -> Image.Image:
    """An RGB image of ``IMAGES[name]``, at most ``MAX_SIDE`` pixels on its longer side."""
    a = image_array(IMAGES[name].loader)
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        a = (255 * (a - a.min()) / max(float(np.ptp(a)), 1e-9)).round().astype(np.uint8)
    img = Image.fromarray(a).convert("RGB")
    if max(img.size) > MAX_SIDE:
        scale = MAX_SIDE / max(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
    return img


# ---------------------------------------------------------------------------------------------- easy-vqa

def _kind(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in ("circle", "rectangle", "triangle") else "colour"


def easy_vqa_items(n: int) -> list[dict]:
    """``n`` easy-vqa test prompts on ``n`` different images, cycling shape / colour / yes-no questions.

    Negated questions ("is there not a ...") are skipped. Deterministic: the test split's own order.
    """
    try:
        import easy_vqa
    except ImportError:
        raise UsageError("the demo's easy-vqa prompts need the easy-vqa package; install it with "
                         "`pip install easy-vqa==1.0` (it is in the dev extra), or pass n_easy_vqa=0") from None
    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    by_image: dict[int, list[int]] = {}
    for i, q in enumerate(questions):
        if " not " in f" {q} " or q.startswith("is no "):
            continue
        by_image.setdefault(image_ids[i], []).append(i)
    kinds = ("shape", "colour", "yes/no")
    items = []
    for image_id, idx in by_image.items():
        if len(items) == n:
            break
        want = kinds[len(items) % len(kinds)]
        i = next((i for i in idx if _kind(answers[i]) == want), idx[0])
        q = questions[i]
        items.append({"path": Path(paths[image_id]), "question": q[0].upper() + q[1:] + EASY_VQA_SUFFIX,
                      "answer": answers[i], "qid": i, "image_id": image_id})
    return items


# ---------------------------------------------------------------------------------------------- write

def _heldout(n: int, fraction: float) -> set[int]:
    """Evenly spread indexes of ``round(n * fraction)`` items (at least one when fraction > 0)."""
    if not 0 <= fraction < 1:
        raise UsageError(f"heldout_fraction must be in [0, 1), got {fraction}")
    k = min(n, max(1, round(n * fraction))) if fraction > 0 and n else 0
    return {int(j * n / k) for j in range(k)} if k else set()


def _licenses_md(rows: list[tuple[str, str, str]]) -> str:
    lines = ["# Image licences", "",
             "Every image of this demo comes from an installed Python package; licences as the package states them.",
             ""]
    lines += [f"- `{rel}`: {source}: {lic}" for rel, source, lic in rows]
    return "\n".join(lines) + "\n"


def write_demo_import(dest_dir: Path, *, n_easy_vqa: int = 8, heldout_fraction: float = 0.2) -> Path:
    """Write the demo images, ``questions.jsonl`` and ``LICENSES.md`` into ``dest_dir``; returns the JSONL.

    Rows: every scikit-image photo (and two drawings) with 1-3 questions, all ``train``; then
    ``n_easy_vqa`` easy-vqa prompts with exact ``reference`` answers, of which ``heldout_fraction``
    (evenly spread) are ``heldout`` -- the eval step's set, which the ``reference`` judge can score.
    Deterministic: the same files on every run.
    """
    if n_easy_vqa < 0:
        raise UsageError(f"n_easy_vqa must be >= 0, got {n_easy_vqa}")
    dest = Path(dest_dir)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    rows, licences = [], []
    for name, item in IMAGES.items():
        rel = f"images/{name}.png"
        image(name).save(dest / rel, format="PNG")
        source = f"skimage:{item.loader}"
        licences.append((rel, f"skimage.data.{item.loader} ({item.kind})", item.license))
        for j, question in enumerate(item.questions):
            row = {"image": rel, "question": question, "id": f"{name}-{j}", "split": "train",
                   "meta": {"source": source, "kind": item.kind, "license": item.license}}
            if item.reference and j in item.reference:
                row["reference"] = item.reference[j]
            rows.append(row)
    vqa = easy_vqa_items(n_easy_vqa) if n_easy_vqa else []
    held = _heldout(len(vqa), heldout_fraction)
    for i, it in enumerate(vqa):
        rel = f"images/easyvqa-{it['image_id']}.png"
        Image.open(it["path"]).convert("RGB").save(dest / rel, format="PNG")
        licences.append((rel, f"easy_vqa test image {it['image_id']}", EASY_VQA_LICENSE))
        rows.append({"image": rel, "question": it["question"], "id": f"easyvqa-{it['qid']}",
                     "split": "heldout" if i in held else "train", "reference": it["answer"],
                     "meta": {"source": "easy-vqa", "kind": "synthetic", "license": EASY_VQA_LICENSE}})
    (dest / "LICENSES.md").write_text(_licenses_md(licences), encoding="utf-8")
    out = dest / "questions.jsonl"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    log.info("wrote %d demo prompts on %d images to %s", len(rows), len(IMAGES) + len(vqa), out)
    return out
