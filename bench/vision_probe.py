"""Diagnostic for loop_learns: is the easy-vqa shape colour linearly readable from the `demo` model's
(untrained) vision features at all?

    python bench/vision_probe.py [--model demo] [--images 600]

A linear probe (multinomial logistic regression, L-BFGS) on the mean-pooled vision-tower features and on
the projector's output predicts the colour of the shape from easy-vqa train images and is scored on
easy-vqa test images. Baselines in the same run: the majority class, and the same probe on raw 16x16
pixels. If the probe reads the colour well, the information reaches the language model and a loop that
does not learn the colour questions is short of learning signal, not of visual information.
"""

from __future__ import annotations

import argparse
import collections
import json

import common

COLORS = ["red", "green", "blue", "yellow", "teal", "brown", "black", "gray"]


def labelled(questions, paths, n: int) -> tuple[list[str], list[int]]:
    """Up to n images with their shape colour (from the "What color is the shape?" answers)."""
    label = {}
    for _q, answer, image_id in zip(*questions, strict=True):
        if answer in COLORS:
            label[image_id] = COLORS.index(answer)
    ids = sorted(label)[:n]
    return [paths[i] for i in ids], [label[i] for i in ids]


class Probe:
    """Standardised inputs, a linear layer, cross-entropy + a small L2 penalty, fitted with L-BFGS."""

    def fit(self, x, y):
        import torch

        x = torch.as_tensor(x, dtype=torch.float32)
        self.mu, self.sd = x.mean(0), x.std(0) + 1e-6
        x, y = (x - self.mu) / self.sd, torch.as_tensor(y)
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(x.shape[1], len(COLORS))
        opt = torch.optim.LBFGS(self.linear.parameters(), max_iter=500)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(self.linear(x), y) + 1e-3 * self.linear.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return self

    def score(self, x, y) -> float:
        import torch

        x = (torch.as_tensor(x, dtype=torch.float32) - self.mu) / self.sd
        with torch.no_grad():
            return float((self.linear(x).argmax(1) == torch.as_tensor(y)).float().mean())


def features(model, processor, paths: list[str], where: str):
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for i in range(0, len(paths), 32):
        images = [Image.open(p).convert("RGB") for p in paths[i:i + 32]]
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
            if where == "projector":
                hidden = model.model.multi_modal_projector(hidden)
        out.append(hidden.mean(1).numpy())
    return np.concatenate(out)


def raw_pixels(paths: list[str]):
    import numpy as np
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert("RGB").resize((16, 16))).reshape(-1) / 255 for p in paths])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo", choices=["demo", "tiny"])
    ap.add_argument("--images", type=int, default=600, help="train and test images each (at most)")
    opts = ap.parse_args()

    import tempfile
    from pathlib import Path

    import easy_vqa

    from backend.models import load_model, load_processor

    with tempfile.TemporaryDirectory(prefix="bench-probe-") as tmp:
        folder = common.base_model(opts.model, Path(tmp) / "model")
        model, processor = load_model(folder), load_processor(folder)
        train_paths, train_y = labelled(easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths(), opts.images)
        test_paths, test_y = labelled(easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths(), opts.images)
        chance = max(collections.Counter(test_y).values()) / len(test_y)
        print(f"model {opts.model}: colour of the easy-vqa shape, {len(train_paths)} train / {len(test_paths)} test "
              f"images, {len(COLORS)} colours; majority class {chance:.3f}")
        result = {"chance": round(chance, 3)}
        sizes = sorted({min(120, len(train_y)), len(train_y)})
        for where in ("tower", "projector"):
            x_train, x_test = features(model, processor, train_paths, where), features(model, processor, test_paths, where)
            for n in sizes:
                acc = Probe().fit(x_train[:n], train_y[:n]).score(x_test, test_y)
                result[f"{where}_{n}"] = round(acc, 3)
                print(f"{where:>9} features, probe fitted on {n:4d} images: test accuracy {acc:.3f}")
        px_train, px_test = raw_pixels(train_paths), raw_pixels(test_paths)
        for n in sizes:
            acc = Probe().fit(px_train[:n], train_y[:n]).score(px_test, test_y)
            result[f"pixels_{n}"] = round(acc, 3)
            print(f"raw 16x16 pixels, probe fitted on {n:4d} images: test accuracy {acc:.3f}")
        print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
