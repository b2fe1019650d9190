"""Training and test transforms of the OffSeg recipe, on ``torchvision.transforms.v2``.

The training pipeline is the reference one (mmsegmentation configs the paper trains with), in order:

1. :class:`RandomResizeKeepRatio` – scale ``(2048, 512)`` times a ratio drawn from ``U(0.5, 2.0)``,
   keeping the aspect ratio (long side ≤ 2048·r, short side ≤ 512·r); image bilinear, mask nearest.
2. :class:`RandomCropCatMax` – random ``crop × crop`` window; re-drawn (up to 10 times) while one
   category covers ≥ 75 % of the labelled pixels of the window or only one category is present.
3. ``v2.RandomHorizontalFlip(0.5)``.
4. :class:`PhotoMetricDistortion` – brightness, contrast (before or after the colour steps),
   saturation and hue, each applied with probability 0.5, as mmsegmentation's transform.
5. Normalisation with the ImageNet mean/std on 0–255 RGB, then :class:`PadToSize` bottom/right to
   the crop size with 0 for the (normalised) image and 255 for the mask, as the reference pads
   after normalising.

Images are ``tv_tensors.Image`` (``uint8`` until normalised, 0–255 RGB) and label maps
``tv_tensors.Mask`` of train ids (``uint8``, 255 = ignore), so every geometric op keeps them aligned.
The test transform resizes the image only (to the dataset's test scale, keep-ratio); the label stays
at its original size and the metric compares at that size, as the reference does.

Randomness: :func:`seeded` runs a transform under a private torch RNG seeded from
``(seed, epoch, sample index)``, so an augmented sample does not depend on worker count, prefetching
or on where a resumed run restarted.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from offseg_hf.data.files import IGNORE_INDEX  # the label tables' ignore value

# ImageNet statistics on 0-255 RGB (the reference configs'; image_processing_offseg divides them by 255).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

__all__ = [
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PadToSize",
    "PhotoMetricDistortion",
    "RandomCropCatMax",
    "RandomResizeKeepRatio",
    "ResizeKeepRatio",
    "build_test_transform",
    "build_train_transform",
    "keep_ratio_size",
    "sample_seed",
    "seeded",
    "to_tv_tensors",
]


def _find(flat_inputs: list[Any], kind: type) -> Any:
    for item in flat_inputs:
        if isinstance(item, kind):
            return item
    return None


def _image_size(flat_inputs: list[Any]) -> tuple[int, int]:
    """(H, W) of the first image or mask among the inputs."""
    item = _find(flat_inputs, tv_tensors.Image)
    if item is None:
        item = _find(flat_inputs, tv_tensors.Mask)
    if item is None:
        raise TypeError("expected a tv_tensors.Image or tv_tensors.Mask among the transform inputs")
    return int(item.shape[-2]), int(item.shape[-1])


def keep_ratio_size(height: int, width: int, scale: Sequence[float]) -> tuple[int, int]:
    """Output size of a keep-ratio resize into ``scale`` (the rule of mmcv's ``rescale_size``).

    The factor is the largest one with long side ≤ ``max(scale)`` and short side ≤ ``min(scale)``;
    sizes are rounded half up.

    Returns:
        ``(new_height, new_width)``.
    """
    long_limit, short_limit = max(scale), min(scale)
    factor = min(long_limit / max(height, width), short_limit / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


class ResizeKeepRatio(v2.Transform):
    """Deterministic keep-ratio resize into ``scale`` (image bilinear, mask nearest).

    ``resize_mask=False`` leaves masks at their size (test time: the metric works at label size).
    """

    def __init__(self, scale: Sequence[int] = (2048, 512), resize_mask: bool = True):
        super().__init__()
        self.scale = tuple(scale)
        self.resize_mask = resize_mask

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"size": keep_ratio_size(*_image_size(flat_inputs), self.scale)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            if not self.resize_mask:
                return inpt
            return F.resize(inpt, list(params["size"]), interpolation=v2.InterpolationMode.NEAREST)
        if isinstance(inpt, tv_tensors.Image):
            return F.resize(inpt, list(params["size"]), interpolation=v2.InterpolationMode.BILINEAR, antialias=False)
        return inpt


class RandomResizeKeepRatio(ResizeKeepRatio):
    """Keep-ratio resize into ``scale × r``, ``r ~ U(ratio_range)`` (mmseg ``RandomResize``, ``keep_ratio=True``)."""

    def __init__(self, scale: Sequence[int] = (2048, 512), ratio_range: Sequence[float] = (0.5, 2.0)):
        super().__init__(scale)
        self.ratio_range = tuple(ratio_range)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        low, high = self.ratio_range
        ratio = low + (high - low) * float(torch.rand(()))
        target = (self.scale[0] * ratio, self.scale[1] * ratio)
        return {"size": keep_ratio_size(*_image_size(flat_inputs), target)}


class RandomCropCatMax(v2.Transform):
    """Random crop of at most ``size`` whose dominant category covers < ``cat_max_ratio`` of it.

    As mmsegmentation's ``RandomCrop``: a window is drawn uniformly; while its labelled pixels (not
    ``ignore_index``) hold fewer than two categories or the largest one has a share ≥
    ``cat_max_ratio``, a new window is drawn, at most ``max_tries`` times (the last draw is kept
    whatever it holds). Images smaller than ``size`` are cropped to their own size on that side
    (padding comes later, see :class:`PadToSize`).
    """

    def __init__(
        self,
        size: int | Sequence[int],
        cat_max_ratio: float = 0.75,
        ignore_index: int = IGNORE_INDEX,
        max_tries: int = 10,
    ):
        super().__init__()
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index
        self.max_tries = max_tries

    def _draw(self, height: int, width: int) -> tuple[int, int, int, int]:
        crop_h, crop_w = min(self.size[0], height), min(self.size[1], width)
        top = int(torch.randint(0, height - crop_h + 1, ()))
        left = int(torch.randint(0, width - crop_w + 1, ()))
        return top, left, crop_h, crop_w

    def _acceptable(self, mask: torch.Tensor, box: tuple[int, int, int, int]) -> bool:
        top, left, crop_h, crop_w = box
        window = mask[..., top : top + crop_h, left : left + crop_w].reshape(-1)
        window = window[window != self.ignore_index]
        if window.numel() == 0:
            return False
        counts = torch.bincount(window.long())
        counts = counts[counts > 0]
        return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < self.cat_max_ratio

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = _image_size(flat_inputs)
        box = self._draw(height, width)
        mask = _find(flat_inputs, tv_tensors.Mask)
        if mask is not None and self.cat_max_ratio < 1.0:
            for _ in range(self.max_tries):
                if self._acceptable(mask, box):
                    break
                box = self._draw(height, width)
        return {"box": box}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            return F.crop(inpt, *params["box"])
        return inpt


def _rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    """``(3, H, W)`` float RGB in [0, 1] → HSV with H, S, V in [0, 1]."""
    r, g, b = image.unbind(0)
    maxc, _ = image.max(0)
    minc, _ = image.min(0)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp(min=1e-12), torch.zeros_like(maxc))
    safe = delta.clamp(min=1e-12)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc])


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_rgb_to_hsv`."""
    h, s, v = hsv.unbind(0)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = torch.zeros_like(hsv)
    for index, (r, g, b) in enumerate(choices):
        sel = i == index
        out[0] = torch.where(sel, r, out[0])
        out[1] = torch.where(sel, g, out[1])
        out[2] = torch.where(sel, b, out[2])
    return out


class PhotoMetricDistortion(v2.Transform):
    """mmsegmentation's ``PhotoMetricDistortion`` on ``uint8`` RGB images (masks pass through).

    Each step is applied with probability 0.5, in this order: brightness (add ``U(-32, 32)``),
    contrast (multiply by ``U(0.5, 1.5)``) either here or last (coin flip), saturation (HSV S times
    ``U(0.5, 1.5)``), hue (HSV H shifted by an integer in ``[-18, 18]`` of OpenCV's 180 steps).
    Values are clipped to 0–255 and rounded down to ``uint8`` after every step, as the reference
    does. HSV is computed in float rather than OpenCV's 8-bit HSV, a difference of at most a grey level.
    """

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: int = 18,
    ):
        super().__init__()
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta

    @staticmethod
    def _coin() -> bool:
        return bool(torch.randint(0, 2, ()))

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand(()))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        params: dict[str, Any] = {"brightness": None, "contrast": None, "saturation": None, "hue": None}
        if self._coin():
            params["brightness"] = self._uniform(-self.brightness_delta, self.brightness_delta)
        params["contrast_first"] = self._coin()
        if self._coin():
            params["contrast"] = self._uniform(*self.contrast_range)
        if self._coin():
            params["saturation"] = self._uniform(*self.saturation_range)
        if self._coin():
            params["hue"] = int(torch.randint(-self.hue_delta, self.hue_delta + 1, ()))
        return params

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        if inpt.dtype != torch.uint8:
            raise TypeError(f"PhotoMetricDistortion expects a uint8 image (0-255), got {inpt.dtype}")
        image = inpt.as_subclass(torch.Tensor).float()

        def clip(x: torch.Tensor) -> torch.Tensor:
            return x.clamp(0, 255).floor()

        if params["brightness"] is not None:
            image = clip(image + params["brightness"])
        if params["contrast_first"] and params["contrast"] is not None:
            image = clip(image * params["contrast"])
        if params["saturation"] is not None or params["hue"] is not None:
            hsv = _rgb_to_hsv(image / 255.0)
            if params["saturation"] is not None:
                hsv[1] = (hsv[1] * params["saturation"]).clamp(0, 1)
            if params["hue"] is not None:
                hsv[0] = (hsv[0] + params["hue"] / 180.0) % 1.0
            image = clip(_hsv_to_rgb(hsv) * 255.0 + 0.5)
        if not params["contrast_first"] and params["contrast"] is not None:
            image = clip(image * params["contrast"])
        return tv_tensors.wrap(image.to(torch.uint8), like=inpt)


class PadToSize(v2.Transform):
    """Pad bottom/right up to ``size`` (no-op on sides already as large): image ``fill``, mask ``mask_fill``."""

    def __init__(self, size: int | Sequence[int], fill: float = 0.0, mask_fill: int = IGNORE_INDEX):
        super().__init__()
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.fill = fill
        self.mask_fill = mask_fill

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            return inpt
        height, width = inpt.shape[-2:]
        bottom, right = max(self.size[0] - height, 0), max(self.size[1] - width, 0)
        if not (bottom or right):
            return inpt
        fill = self.mask_fill if isinstance(inpt, tv_tensors.Mask) else self.fill
        return F.pad(inpt, [0, 0, right, bottom], fill=fill)


def build_train_transform(
    crop_size: int | Sequence[int] = 512,
    scale: Sequence[int] = (2048, 512),
    ratio_range: Sequence[float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    flip_prob: float = 0.5,
    photometric: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    ignore_index: int = IGNORE_INDEX,
) -> v2.Compose:
    """The reference training augmentation (see the module docstring).

    Call it as ``image, mask = transform(image, mask)`` with a ``uint8`` ``tv_tensors.Image``
    ``(3, H, W)`` and a ``tv_tensors.Mask`` ``(H, W)``; returns a normalised ``float32`` image
    ``(3, crop, crop)`` and a ``uint8`` mask ``(crop, crop)``.
    """
    steps: list[v2.Transform] = [
        RandomResizeKeepRatio(scale, ratio_range),
        RandomCropCatMax(crop_size, cat_max_ratio, ignore_index),
        v2.RandomHorizontalFlip(flip_prob),
    ]
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps += [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=False),
        v2.Normalize(mean=list(mean), std=list(std)),
        PadToSize(crop_size, fill=0.0, mask_fill=ignore_index),
    ]
    return v2.Compose(steps)


def build_test_transform(
    scale: Sequence[int] | None = (2048, 512),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Test-time transform: keep-ratio resize of the image into ``scale`` (``None``: no resize), normalise.

    The mask is returned unchanged (original size); predictions are resized to it for the metric.
    """
    steps: list[v2.Transform] = []
    if scale is not None:
        steps.append(ResizeKeepRatio(scale, resize_mask=False))
    steps += [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=False),
        v2.Normalize(mean=list(mean), std=list(std)),
    ]
    return v2.Compose(steps)


def to_tv_tensors(image: Any, label: Any) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    """PIL / numpy image (RGB) and label map → ``uint8`` ``tv_tensors.Image (3, H, W)`` and ``Mask (H, W)``.

    Raises:
        ValueError: the label map is not 2-D or its size differs from the image's.
    """
    if hasattr(image, "convert"):  # PIL
        image = image.convert("RGB")
    array = np.array(image)  # a writable copy: torch cannot wrap read-only buffers
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {array.shape}")
    label_array = np.array(label)
    if label_array.ndim != 2:
        raise ValueError(f"expected a single-channel label map (H, W), got shape {label_array.shape}")
    if label_array.shape != array.shape[:2]:
        raise ValueError(f"label map {label_array.shape} and image {array.shape[:2]} differ in size")
    image_t = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1))
    mask_t = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(label_array.astype(np.uint8, copy=False))))
    return image_t, mask_t


def sample_seed(*parts: int | str) -> int:
    """A 63-bit seed from any parts, stable across processes and Python runs (unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seeded(transform, seed: int, *args):
    """Run ``transform(*args)`` under a private torch and ``random`` RNG seeded with ``seed``.

    The global RNG state is restored afterwards, so training randomness elsewhere (dropout, sampler)
    is unaffected.
    """
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            return transform(*args)
        finally:
            random.setstate(state)
