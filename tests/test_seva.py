"""SeVa augmented views: seeded, size/mode preserving augmentations and view specs; SeVa's diffusion noise
(VCD's schedule on the policy processor's normalised tensor)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from annotators.seva import (
    AUGMENTATIONS,
    AUTOAUGMENT_OPS,
    IMAGENET_POLICY,
    PixelSpace,
    View,
    apply_view,
    kept_signal,
    noise_weight,
    parse_view,
)
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


def vcd_kept_signal() -> np.ndarray:
    """sqrt(alphas_prod[t]) for t = 0..999, computed as VCD's vcd_utils/vcd_add_noise.py (and SeVa's
    data/step2/generate_with_aug.py) compute it: torch, float32, ``alphas_bar_sqrt[t]``."""
    import torch

    betas = torch.linspace(-6, 6, 1000)
    betas = torch.sigmoid(betas) * (0.5e-2 - 1e-5) + 1e-5
    alphas_prod = torch.cumprod(1 - betas, dim=0)
    return torch.sqrt(alphas_prod).double().numpy()


def test_kept_signal_is_seva_formula():
    reference = vcd_kept_signal()
    ours = np.array([kept_signal(t) for t in range(1000)])
    assert np.abs(ours - reference).max() < 1e-5
    assert all(abs(kept_signal(t) ** 2 + noise_weight(t) ** 2 - 1.0) < 1e-12 for t in range(1000))
    # SeVa's two settings: 500 (13B) keeps 0.863 of the image, 800 (7B) 0.467; the old linear-beta
    # DDPM schedule kept 0.280 at 500
    assert round(kept_signal(500), 3) == 0.863 and round(kept_signal(800), 3) == 0.467
    assert kept_signal(0) > 0.99998 and 0.28 < kept_signal(999) < 0.29
    assert np.all(np.diff(ours) < 0)


def mid_photo(size=(64, 48)) -> Image.Image:
    """photo() squeezed into pixel values 64-191, so moderate noise seldom clips."""
    return Image.fromarray((arr(photo(size)) * 0.5 + 64).astype(np.uint8))


@pytest.mark.parametrize("space", [PixelSpace(), PixelSpace(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))],
                         ids=["clip", "half"])
@pytest.mark.parametrize("T", [0, 300, 500, 800])
def test_diffusion_view_is_a_x_plus_b_eps_in_normalised_space(space, T):
    img, seed = mid_photo(), 11
    out, rec = apply_view(parse_view(f"aug:diffusion:{T}"), img, seed=seed, space=space)
    assert rec == {"name": "diffusion", "params": {"T": T}, "seed": seed} and out.size == img.size
    x = space.normalise(img)
    eps = np.random.default_rng(seed).standard_normal(x.shape)  # the view's noise: one draw per element
    ideal = kept_signal(T) * x + noise_weight(T) * eps
    pixels = (ideal * np.asarray(space.std) + np.asarray(space.mean)) * 255
    inside = (pixels > 0.5) & (pixels < 254.5)
    assert inside.mean() > (0.7 if T else 0.999)  # std 0.5 at T = 800: noise sd 113 levels, 27% clip
    step = 0.5 / 255 / np.asarray(space.std)  # half a uint8 level, in normalised units, per channel
    error = np.abs(space.normalise(out) - ideal)
    assert np.all(error[inside] <= np.broadcast_to(step, x.shape)[inside] + 1e-9)
    assert np.all(np.asarray(out)[~inside] % 255 == 0)  # the rest is clipped to 0 or 255


def test_diffusion_noise_grows_with_T_and_keeps_sevas_signal_at_999():
    img = photo(size=(96, 96))
    c = {T: corr(apply_view(parse_view(f"aug:diffusion:{T}"), img, seed=3)[0], img)
         for T in (0, 50, 500, 800, 999)}
    assert c[0] > 0.999 and c[0] > c[50] > c[500] > c[800] > c[999]
    assert 0.1 < c[999] < 0.5  # VCD's schedule ends at 0.285 of the image, never pure noise


def test_diffusion_at_the_processor_resolution_is_resized_once():
    img = photo(size=(90, 60))
    space = PixelSpace(resize=lambda im: im.resize((30, 20), Image.Resampling.BICUBIC))
    out, _ = apply_view(parse_view("aug:diffusion:800"), img, seed=1, space=space)
    assert out.size == (30, 20) and out.mode == "RGB"
    gray, _ = apply_view(parse_view("aug:diffusion:800"), img.convert("L"), seed=1, space=space)
    assert gray.size == (30, 20) and gray.mode == "L"
    flipped, _ = apply_view(parse_view("aug:hflip"), img, seed=1, space=space)
    assert flipped.size == img.size  # only the views that work in the processor's space are resized
    assert parse_view("aug:diffusion:800").in_pixel_space and not parse_view("aug:flip").in_pixel_space


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
    ("aug:diffusion:1000", "T must be between 0 and 999"),
    ("aug:diffusion:-1", "T must be between 0 and 999"),
    ("aug:flip:3", "flip takes 0 argument(s), got 1"),
])
def test_parse_view_rejects_bad_specs_with_the_choices(spec, why):
    with pytest.raises(UsageError) as exc:
        parse_view(spec)
    msg = str(exc.value)
    assert why in msg
    assert "aug:diffusion" in msg and "original" in msg


# ---- through each family's own processor -----------------------------------------------------------

def processed(image_processor, img: Image.Image) -> np.ndarray:
    return np.asarray(image_processor(img, return_tensors="np")["pixel_values"], dtype=np.float64)


@pytest.mark.parametrize("name", ["tiny", "tiny-llava-onevision", "tiny-qwen2-vl", "tiny-idefics3"])
def test_policy_noise_lands_on_the_processor_tensor(name, tiny_model_dir, family_dirs):
    """The view is made at the size the family's processor samples the image at, so the processor does not
    resample it again, and the model's tensor is a * clean + b * N(0, 1): exactly on LLaVA's 32 px crop
    and Qwen2-VL's patches; on OneVision's and Idefics3's tiles, with a downsampled (less noisy) overview."""
    from backend.families import FAMILIES, family_of
    from backend.models import load_processor
    from backend.noise_space import RESIZES, policy_pixel_space

    assert set(RESIZES) == set(FAMILIES)
    folder = tiny_model_dir if name == "tiny" else family_dirs[name]
    space = policy_pixel_space(folder)
    ip = load_processor(folder).image_processor
    assert (space.mean, space.std) == (tuple(ip.image_mean), tuple(ip.image_std))
    img, T, seed = mid_photo(size=(90, 60)), 300, 4
    view, _ = apply_view(parse_view(f"aug:diffusion:{T}"), img, seed=seed, space=space)
    assert view.size == space.resize(img).size != img.size
    assert np.array_equal(np.asarray(space.resize(view)), np.asarray(view))  # resized once, by us
    residual = processed(ip, view) - kept_signal(T) * processed(ip, img)
    ratio = residual.std() / noise_weight(T)
    if family_of(folder).model_type in ("llava", "qwen2_vl"):
        assert abs(residual.mean()) < 0.05 and 0.95 < ratio < 1.05, ratio
    else:
        assert 0.6 < ratio < 1.05, ratio
    if name == "tiny":  # CLIP: shortest edge resized, centre crop: the crop of a x + b eps, to rounding
        x = space.normalise(space.resize(img))
        eps = np.random.default_rng(seed).standard_normal(x.shape)
        w, h = view.size
        top, left = (h - 32) // 2, (w - 32) // 2
        ideal = (kept_signal(T) * x + noise_weight(T) * eps)[top:top + 32, left:left + 32].transpose(2, 0, 1)
        assert np.abs(processed(ip, view)[0] - ideal).max() < 0.5 / 255 / min(space.std) + 1e-6
