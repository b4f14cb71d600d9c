"""SeVa augmented views: seeded, size/mode preserving augmentations and view specs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from annotators.seva import AUGMENTATIONS, AUTOAUGMENT_OPS, IMAGENET_POLICY, View, apply_view, parse_view
from core.errors import UsageError

ALL_VIEWS = ["aug:flip", "aug:hflip", "aug:crop", "aug:autoaugment", "aug:moco", "aug:diffusion:500"]


def photo(size=(64, 48), mode="RGB") -> Image.Image:
    """A smooth gradient with texture, so every augmentation changes something visible."""
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    rgb = np.stack([x, y, (np.sin(8 * x) * np.cos(6 * y) + 1) / 2], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8)).convert(mode)


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.float64)


def corr(a: Image.Image, b: Image.Image) -> float:
    return float(np.corrcoef(arr(a).ravel(), arr(b).ravel())[0, 1])


def test_every_registered_augmentation_has_a_view_under_test():
    assert {parse_view(v).name for v in ALL_VIEWS} == set(AUGMENTATIONS)


@pytest.mark.parametrize("spec", ALL_VIEWS)
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_deterministic_for_a_seed_and_keeps_size_and_mode(spec, mode):
    img = photo(mode=mode)
    view = parse_view(spec)
    first, rec1 = apply_view(view, img, seed=123)
    again, rec2 = apply_view(view, img, seed=123)
    assert first.size == img.size and first.mode == img.mode
    assert np.array_equal(arr(first), arr(again))
    assert rec1 == rec2 == {"name": view.name, "params": view.params, "seed": 123}
    assert json.loads(json.dumps(rec1)) == rec1
    outs = [arr(apply_view(view, img, seed=s)[0]) for s in range(12)]
    changed = [not np.array_equal(o, arr(img)) for o in outs]
    assert any(changed), f"{spec} never changed the image over 12 seeds"
    if spec != "aug:hflip":
        assert len({o.tobytes() for o in outs}) > 1, f"{spec} ignores its seed"


def test_flip_is_a_coin_and_hflip_always_flips():
    img = photo()
    mirrored = arr(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    flips = [np.array_equal(arr(apply_view(parse_view("aug:flip"), img, s)[0]), mirrored) for s in range(40)]
    assert 8 <= sum(flips) <= 32
    for s in range(5):
        assert np.array_equal(arr(apply_view(parse_view("aug:hflip"), img, s)[0]), mirrored)


def test_crop_zooms_into_part_of_the_image():
    img = photo(size=(80, 60))
    out, _ = apply_view(parse_view("aug:crop"), img, seed=1)
    # a resized crop of a left-to-right gradient spans a narrower red range than the whole image
    red_in, red_out = arr(img)[..., 0], arr(out)[..., 0]
    assert red_out.max() - red_out.min() < red_in.max() - red_in.min()


def test_autoaugment_policy_is_the_imagenet_one():
    assert len(IMAGENET_POLICY) == 25
    for sub in IMAGENET_POLICY:
        assert len(sub) == 2
        for op, prob, mag in sub:
            assert op in AUTOAUGMENT_OPS and 0.0 <= prob <= 1.0 and (mag is None or 0 <= mag <= 9)
    img = photo()
    for op, fn in AUTOAUGMENT_OPS.items():
        out = fn(img, 9, np.random.default_rng(0))
        assert out.size == img.size and out.mode == img.mode, op


def test_diffusion_zero_steps_is_the_identity():
    img = photo()
    out, rec = apply_view(parse_view("aug:diffusion:0"), img, seed=5)
    assert np.array_equal(arr(out), arr(img))
    assert rec["params"] == {"T": 0}


def test_diffusion_noise_grows_with_T_and_is_nearly_pure_at_999():
    img = photo(size=(96, 96))
    c = {T: corr(apply_view(parse_view(f"aug:diffusion:{T}"), img, seed=3)[0], img) for T in (50, 500, 999)}
    assert c[50] > c[500] > c[999]
    assert abs(c[999]) < 0.05
    assert c[50] > 0.5


def test_original_view_is_untouched():
    img = photo()
    out, rec = apply_view(parse_view("original"), img, seed=9)
    assert out is img and rec is None


@pytest.mark.parametrize("spec,expected", [
    ("original", View("original")),
    ("aug:flip", View("flip")),
    ("aug:moco", View("moco")),
    ("aug:diffusion:800", View("diffusion", {"T": 800})),
    ("aug:diffusion", View("diffusion", {"T": 500})),
    (" aug:crop ", View("crop")),
])
def test_parse_view(spec, expected):
    view = parse_view(spec)
    assert view == expected
    assert parse_view(view.spec) == view


@pytest.mark.parametrize("spec,why", [
    ("", "empty"),
    ("aug:", "does not start with `aug:`"),
    ("augment:flip", "does not start with `aug:`"),
    ("Original", "does not start with `aug:`"),
    ("aug:blur", "unknown augmentation 'blur'"),
    ("aug:diffusion:lots", "T:"),
    ("aug:diffusion:1001", "T must be between 0 and 1000"),
    ("aug:diffusion:-1", "T must be between 0 and 1000"),
    ("aug:flip:3", "flip takes 0 argument(s), got 1"),
])
def test_parse_view_rejects_bad_specs_with_the_choices(spec, why):
    with pytest.raises(UsageError) as exc:
        parse_view(spec)
    msg = str(exc.value)
    assert why in msg
    assert "aug:diffusion" in msg and "original" in msg
