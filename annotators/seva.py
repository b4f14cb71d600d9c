"""SeVa augmented views: seeded image augmentations on PIL images (PIL + numpy only, no torchvision).

A view spec names what the policy looks at: ``original``, or ``aug:NAME[:ARG...]`` for an entry of
``AUGMENTATIONS`` (e.g. ``aug:flip``, ``aug:crop``, ``aug:autoaugment``, ``aug:moco``,
``aug:diffusion:800``). ``apply_view(parse_view(spec), image, seed)`` gives the augmented image and a
JSON-able record ``{"name", "params", "seed"}`` kept with the candidate. Each augmentation is
deterministic for a seed and keeps the image's mode and size, except that ``diffusion`` works at the
resolution of the policy's image processor (``PixelSpace``; ``backend.noise_space`` builds it).

``diffusion`` is SeVa's noise as its code adds it (``add_diffusion_noise`` in SeVa's
``data/step2/generate_with_aug.py``, copied from VCD): x_T = sqrt(abar_T) x + sqrt(1 - abar_T) eps with
VCD's sigmoid beta schedule, on the processor-normalised tensor x. The view is that tensor de-normalised
to an RGB image, so values outside [0, 255] are clipped and the rest rounded to uint8 (SeVa passes the
float tensor on). On photos at 336 px about 5-7% of the values clip at T = 500-800, and the image's
weight in what the model sees is 0.84 instead of 0.863 at T = 500, 0.44 instead of 0.467 at T = 800
(rounding alone adds noise of sd 0.004 in normalised units).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from core.errors import UsageError

ORIGINAL = "original"
AUG_PREFIX = "aug"
Rng = np.random.Generator


# ---- building blocks ---------------------------------------------------------------------------

def _hflip(img: Image.Image) -> Image.Image:
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def _resized_crop(img: Image.Image, rng: Rng, scale: tuple[float, float],
                  ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
    """torchvision's RandomResizedCrop box (10 tries, then a centre crop), resized back to the input size."""
    width, height = img.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            break
    else:
        in_ratio = width / height
        if in_ratio < min(ratio):
            w, h = width, round(width / min(ratio))
        elif in_ratio > max(ratio):
            w, h = round(height * max(ratio)), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    return img.resize((width, height), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))


# ---- AutoAugment (ImageNet policy, Cubuk et al. 2019; magnitudes as in torchvision) -------------

_BINS = 10


def _signed(rng: Rng, value: float) -> float:
    return -value if rng.random() < 0.5 else value


def _shear(axis: int):
    def op(img, mag, rng):
        s = _signed(rng, np.linspace(0.0, 0.3, _BINS)[mag])
        coeffs = (1, s, 0, 0, 1, 0) if axis == 0 else (1, 0, 0, s, 1, 0)
        return img.transform(img.size, Image.Transform.AFFINE, coeffs, Image.Resampling.NEAREST)
    return op


def _enhance(cls):
    def op(img, mag, rng):
        return cls(img).enhance(1.0 + _signed(rng, np.linspace(0.0, 0.9, _BINS)[mag]))
    return op


def _posterize_bits(mag: int) -> int:
    return int(8 - round(mag / ((_BINS - 1) / 4)))


AUTOAUGMENT_OPS: dict[str, Callable[[Image.Image, int, Rng], Image.Image]] = {
    "ShearX": _shear(0),
    "ShearY": _shear(1),
    "Rotate": lambda img, mag, rng: img.rotate(_signed(rng, np.linspace(0.0, 30.0, _BINS)[mag]),
                                               resample=Image.Resampling.NEAREST),
    "Color": _enhance(ImageEnhance.Color),
    "Contrast": _enhance(ImageEnhance.Contrast),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Posterize": lambda img, mag, rng: ImageOps.posterize(img, _posterize_bits(mag)),
    "Solarize": lambda img, mag, rng: ImageOps.solarize(img, float(np.linspace(255.0, 0.0, _BINS)[mag])),
    "AutoContrast": lambda img, mag, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, mag, rng: ImageOps.equalize(img),
    "Invert": lambda img, mag, rng: ImageOps.invert(img),
}

# 25 sub-policies: two (op, probability, magnitude bin) each.
IMAGENET_POLICY: tuple[tuple[tuple[str, float, int | None], ...], ...] = (
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, None)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
    (("Equalize", 0.0, None), ("Equalize", 0.8, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, None)),
    (("Color", 0.4, 0), ("Equalize", 0.6, None)),
    (("Equalize", 0.4, None), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
    (("Invert", 0.6, None), ("Equalize", 1.0, None)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
)


def autoaugment(img: Image.Image, rng: Rng) -> Image.Image:
    """One random ImageNet sub-policy; each of its two ops applied with its probability."""
    policy = IMAGENET_POLICY[int(rng.integers(len(IMAGENET_POLICY)))]
    for op, prob, mag in policy:
        if rng.random() <= prob:
            img = AUTOAUGMENT_OPS[op](img, mag or 0, rng)
    return img


# ---- MoCo v2 -----------------------------------------------------------------------------------

def _adjust_hue(img: Image.Image, factor: float) -> Image.Image:
    if img.mode != "RGB":
        return img
    h, s, v = img.convert("HSV").split()
    h_arr = (np.asarray(h, dtype=np.int16) + int(factor * 255)) % 256
    return Image.merge("HSV", (Image.fromarray(h_arr.astype(np.uint8)), s, v)).convert("RGB")


def _color_jitter(img: Image.Image, rng: Rng, b=0.4, c=0.4, s=0.4, h=0.1) -> Image.Image:
    """torchvision ColorJitter: brightness, contrast, saturation, hue factors, in a random order."""
    factors = (rng.uniform(1 - b, 1 + b), rng.uniform(1 - c, 1 + c), rng.uniform(1 - s, 1 + s), rng.uniform(-h, h))
    ops = (
        lambda im: ImageEnhance.Brightness(im).enhance(factors[0]),
        lambda im: ImageEnhance.Contrast(im).enhance(factors[1]),
        lambda im: ImageEnhance.Color(im).enhance(factors[2]),
        lambda im: _adjust_hue(im, factors[3]),
    )
    for i in rng.permutation(4):
        img = ops[i](img)
    return img


def moco(img: Image.Image, rng: Rng) -> Image.Image:
    """MoCo v2: resized crop (0.2-1), colour jitter p=0.8, grayscale p=0.2, blur p=0.5, flip p=0.5."""
    img = _resized_crop(img, rng, scale=(0.2, 1.0))
    if rng.random() < 0.8:
        img = _color_jitter(img, rng)
    if rng.random() < 0.2:
        img = img.convert("L").convert(img.mode)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.1, 2.0))))
    if rng.random() < 0.5:
        img = _hflip(img)
    return img


# ---- diffusion noise (SeVa's, from VCD's vcd_utils/vcd_add_noise.py) ----------------------------

DIFFUSION_STEPS = 1000
_BETAS = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, DIFFUSION_STEPS))) * (0.5e-2 - 1e-5) + 1e-5
ALPHA_BAR = np.cumprod(1.0 - _BETAS)
"""VCD's ``alphas_prod``: sigmoid betas from 1e-5 to 5e-3 over 1000 steps; ``ALPHA_BAR[T]`` is the product
over steps 0..T, indexed by T as VCD and SeVa index it (so T = 0 already adds a little noise)."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def kept_signal(T: int) -> float:
    """sqrt(ALPHA_BAR[T]): the weight of the clean normalised image in the T-step view (SeVa: 0.863 at 500,
    0.467 at 800)."""
    return math.sqrt(ALPHA_BAR[T])


def noise_weight(T: int) -> float:
    """sqrt(1 - ALPHA_BAR[T]): the weight of the standard normal noise in the T-step view."""
    return math.sqrt(1.0 - ALPHA_BAR[T])


@dataclass(frozen=True)
class PixelSpace:
    """Where SeVa adds its noise: the policy's image-processor tensor, i.e. pixels scaled to [0, 1] and
    normalised per channel, at the resolution the processor resamples the image to (LLaVA-1.5: CLIP mean
    and std, 336 px). ``backend.noise_space`` builds it from the policy's processor; the default is CLIP's
    normalisation at the image's own size."""

    mean: tuple[float, ...] = CLIP_MEAN
    """Per-channel mean of the normalisation (the processor's ``image_mean``)."""
    std: tuple[float, ...] = CLIP_STD
    """Per-channel standard deviation (``image_std``)."""
    resize: Callable[[Image.Image], Image.Image] | None = None
    """The processor's own resampling, applied to the image before the noise so that each noise value lands
    on one element of the tensor the model sees; the view keeps that size. None: the image's own size."""

    def normalise(self, img: Image.Image) -> np.ndarray:
        """The (H, W, 3) normalised tensor of an image, as the processor computes it."""
        rgb = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
        return (rgb - np.asarray(self.mean)) / np.asarray(self.std)

    def to_image(self, x: np.ndarray) -> Image.Image:
        """The RGB image whose normalised tensor is ``x``, up to uint8 rounding and clipping to [0, 255]."""
        pixels = (x * np.asarray(self.std) + np.asarray(self.mean)) * 255.0
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def diffusion(img: Image.Image, rng: Rng, T: int = 500, space: PixelSpace | None = None) -> Image.Image:
    """SeVa's view (VCD's ``add_diffusion_noise``): x_T = sqrt(abar_T) x + sqrt(1 - abar_T) eps on the
    normalised tensor x, eps ~ N(0, 1) per element; returned as an image (rounded, clipped)."""
    space = space or PixelSpace()
    x = space.normalise(img)
    return space.to_image(kept_signal(T) * x + noise_weight(T) * rng.standard_normal(x.shape))


def _check_T(T: int) -> None:
    if not 0 <= T < DIFFUSION_STEPS:
        raise ValueError(f"T must be between 0 and {DIFFUSION_STEPS - 1}")


# ---- the registry ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    name: str
    type: type
    default: Any
    check: Callable[[Any], None] | None = None


@dataclass(frozen=True)
class Augmentation:
    fn: Callable[..., Image.Image]
    """fn(image, rng, **params) -> image (RGB or L in, same size and mode out)."""
    doc: str
    params: tuple[Param, ...] = ()
    in_pixel_space: bool = False
    """fn also takes ``space=`` (a PixelSpace) and gets the image already resized by ``space.resize``."""


AUGMENTATIONS: dict[str, Augmentation] = {
    "flip": Augmentation(lambda img, rng: _hflip(img) if rng.random() < 0.5 else img,
                         "random horizontal flip, p=0.5 (decided by the seed)"),
    "hflip": Augmentation(lambda img, rng: _hflip(img), "horizontal flip, always"),
    "crop": Augmentation(lambda img, rng: _resized_crop(img, rng, scale=(0.08, 1.0)),
                         "RandomResizedCrop, scale 0.08-1, ratio 3/4-4/3, resized to the original size"),
    "autoaugment": Augmentation(autoaugment, "AutoAugment, ImageNet policy (25 sub-policies)"),
    "moco": Augmentation(moco, "MoCo v2: crop 0.2-1, colour jitter, grayscale, Gaussian blur, flip"),
    "diffusion": Augmentation(diffusion, "SeVa's diffusion noise at step T of 0-999 (VCD's sigmoid betas) on "
                              "the policy's normalised image tensor", (Param("T", int, 500, _check_T),),
                              in_pixel_space=True),
}


@dataclass(frozen=True)
class View:
    name: str
    params: dict = field(default_factory=dict)

    @property
    def is_original(self) -> bool:
        return self.name == ORIGINAL

    @property
    def in_pixel_space(self) -> bool:
        """True for views that add their noise in the policy's PixelSpace (``aug:diffusion``)."""
        return not self.is_original and AUGMENTATIONS[self.name].in_pixel_space

    @property
    def spec(self) -> str:
        """The canonical spec string (``aug:diffusion:500``)."""
        if self.is_original:
            return ORIGINAL
        return ":".join([AUG_PREFIX, self.name, *(str(v) for v in self.params.values())])


def _bad(spec: str, why: str) -> UsageError:
    names = ", ".join(f"aug:{n}" for n in AUGMENTATIONS)
    return UsageError(f"bad view {spec!r}: {why}; views are `original` or one of: {names} "
                      "(diffusion takes the step T, 0-999, e.g. aug:diffusion:800)")


def parse_view(spec: str) -> View:
    """``original`` | ``aug:NAME[:ARG...]`` -> View; a UsageError that lists the choices otherwise."""
    if not isinstance(spec, str) or not spec.strip():
        raise _bad(str(spec), "empty")
    spec = spec.strip()
    if spec == ORIGINAL:
        return View(ORIGINAL)
    prefix, _, rest = spec.partition(":")
    if prefix != AUG_PREFIX or not rest:
        raise _bad(spec, "not `original` and does not start with `aug:`")
    name, *args = rest.split(":")
    aug = AUGMENTATIONS.get(name)
    if aug is None:
        raise _bad(spec, f"unknown augmentation {name!r}")
    if len(args) > len(aug.params):
        raise _bad(spec, f"{name} takes {len(aug.params)} argument(s), got {len(args)}")
    params = {}
    for i, p in enumerate(aug.params):
        try:
            value = p.type(args[i]) if i < len(args) else p.default
            if p.check:
                p.check(value)
        except ValueError as err:
            raise _bad(spec, f"{p.name}: {err}") from None
        params[p.name] = value
    return View(name, params)


def apply_view(view: View, image: Image.Image, seed: int,
               space: PixelSpace | None = None) -> tuple[Image.Image, dict | None]:
    """The image as the view shows it, and the record to store (None for the original view). ``space``: the
    policy's PixelSpace, used by the views that work in it (diffusion); CLIP's at native size when None."""
    if view.is_original:
        return image, None
    rng = np.random.default_rng(seed)
    mode = image.mode
    work = image if mode in ("RGB", "L") else image.convert("RGB")
    aug = AUGMENTATIONS[view.name]
    if aug.in_pixel_space:
        space = space or PixelSpace()
        work = space.resize(work) if space.resize else work
        out = aug.fn(work, rng, space=space, **view.params)
    else:
        out = aug.fn(work, rng, **view.params)
    if out.mode != mode:
        out = out.convert(mode)
    assert out.size == work.size, (view, out.size, work.size)
    return out, {"name": view.name, "params": dict(view.params), "seed": int(seed)}
