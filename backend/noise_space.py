"""SeVa's noise space for a policy: its image processor's normalisation and first resampling.

SeVa adds its diffusion noise to the tensor LLaVA-1.5's CLIP processor makes of the image (shortest edge
resized to 336 px, centre crop, CLIP mean/std). ``pixel_space`` gives the same for any family: the view is
first resized as the family's processor resizes it, so the processor then only crops, tiles or patchifies
it (no second resampling that would average the noise away) and each noise value lands on one element of
the model's tensor. Exact for LLaVA and Qwen2-VL; for LLaVA-OneVision and Idefics3 the tiles are exact and
the extra low-resolution overview the processor adds is downsampled from the noisy view (its noise is
averaged, as it is for the image content).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from annotators.seva import PixelSpace

Resize = Callable[[Any, np.ndarray], np.ndarray]
"""(image processor, CHW uint8 array) -> the array at the size the processor samples it at."""


def _first_resize(ip, chw: np.ndarray) -> np.ndarray:
    """The processor's own ``resize`` with its ``size`` (CLIP: shortest edge; Idefics3: longest edge)."""
    return ip.resize(chw, size=ip.size, resample=ip.resample) if ip.do_resize else chw


def _smart_resize(ip, chw: np.ndarray) -> np.ndarray:
    """Qwen2-VL's smart_resize: multiples of patch_size x merge_size within [min_pixels, max_pixels]."""
    if not ip.do_resize:
        return chw
    return ip.resize(chw, size=ip.size, resample=ip.resample, factor=ip.patch_size * ip.merge_size)


def _idefics3(ip, chw: np.ndarray) -> np.ndarray:
    """Longest edge to ``size``, then to multiples of the tile size (``max_image_size``), as Idefics3 does."""
    chw = _first_resize(ip, chw)
    if ip.do_image_splitting:
        chw = ip.resize_for_vision_encoder(chw, ip.max_image_size["longest_edge"], resample=ip.resample)
    return chw


def _anyres(ip, chw: np.ndarray) -> np.ndarray:
    """Fitted into the best grid resolution (before its padding and tiling), as LLaVA-OneVision does."""
    from transformers.image_processing_utils import select_best_resolution

    best = select_best_resolution(chw.shape[-2:], ip.image_grid_pinpoints)
    return ip._resize_for_patching(chw, best, resample=ip.resample)


RESIZES: dict[str, Resize] = {
    "llava": _first_resize,
    "llava_onevision": _anyres,
    "qwen2_vl": _smart_resize,
    "qwen2_5_vl": _smart_resize,
    "idefics3": _idefics3,
}
"""model_type (``backend.families.FAMILIES``) -> how its processor first resamples an image."""


def _resized(ip, rule: Resize, img: Image.Image) -> Image.Image:
    chw = np.transpose(np.asarray(img.convert("RGB")), (2, 0, 1))
    return Image.fromarray(np.ascontiguousarray(np.transpose(rule(ip, chw), (1, 2, 0))).astype(np.uint8))


def pixel_space(image_processor, model_type: str) -> PixelSpace:
    """The PixelSpace of a loaded (PIL-backend) image processor of the family ``model_type``."""
    ip = image_processor
    channels = 3
    mean = tuple(ip.image_mean) if ip.do_normalize else (0.0,) * channels
    std = tuple(ip.image_std) if ip.do_normalize else (1.0,) * channels
    return PixelSpace(mean=mean, std=std, resize=partial(_resized, ip, RESIZES[model_type]))


def policy_pixel_space(model_path: str | Path, image_processor: dict | None = None) -> PixelSpace:
    """The PixelSpace of the policy folder's processor, with ``policy.image_processor`` applied."""
    from backend.families import family_of
    from backend.models import load_processor

    processor = load_processor(model_path, image_processor=image_processor or None)
    return pixel_space(processor.image_processor, family_of(model_path).model_type)
