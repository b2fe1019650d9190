"""A built-in synthetic segmentation dataset: textured scenes generated on the fly, no download.

Every scene is a function of ``(seed, split, index)`` only, so the dataset is deterministic and
costs no disk. A scene has real spatial structure, not per-pixel noise:

* a background partition of the canvas into 2–5 large regions (a Voronoi diagram of random centres
  with wavy, noise-perturbed boundaries);
* 1–6 foreground shapes (ellipses, rectangles, triangles) of random size and position on top.

Every region or shape belongs to one of ``K`` classes, and a class is defined by its appearance:
a base colour *and* a texture (stripes at a class-specific angle and period, checks, dots, or
smooth blotches). Colours are shared by pairs of classes, so colour alone does not identify a class:
a model must read texture, i.e. look at neighbourhoods. Per-scene illumination (brightness, colour
cast), a global gradient and pixel noise vary the appearance of the same class across scenes.

Usage::

    from offseg_hf.data.synthetic import load_synthetic
    train = load_synthetic("train", num_labels=8, num_samples=2000, image_size=128)
    train[0]  # {"image": PIL RGB, "label": PIL "L" of class ids 0..K-1, "index": 0}
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from functools import cached_property

import numpy as np

__all__ = ["SyntheticScenes", "load_synthetic", "synthetic_class_names", "synthetic_palette"]

_TEXTURES = ("stripes", "checks", "dots", "blotches")
_SPLIT_OFFSETS = {"train": 0, "validation": 1, "test": 2}


def _num_colours(num_labels: int) -> int:
    return max(1, (num_labels + 1) // 2)


def _colour(index: int, num_colours: int) -> tuple[int, int, int]:
    """Well-separated hues, alternating lightness."""
    hue = index / num_colours
    light = 0.45 if index % 2 == 0 else 0.6
    r, g, b = colorsys.hls_to_rgb(hue, light, 0.75)
    return int(r * 255), int(g * 255), int(b * 255)


_HUE_NAMES = ["red", "orange", "yellow", "lime", "green", "teal", "cyan", "azure", "blue", "violet", "purple", "pink"]


def synthetic_class_names(num_labels: int) -> list[str]:
    """Names such as ``"red-stripes"``: colour family and texture of each class."""
    num_colours = _num_colours(num_labels)
    names = []
    for k in range(num_labels):
        colour_index, texture_index = k // 2, (k % 2) + 2 * ((k // 2) % 2)
        hue = _HUE_NAMES[int(colour_index / num_colours * len(_HUE_NAMES)) % len(_HUE_NAMES)]
        names.append(f"{hue}{colour_index}-{_TEXTURES[texture_index % len(_TEXTURES)]}")
    return names


def synthetic_palette(num_labels: int) -> list[tuple[int, int, int]]:
    """One display colour per class (the class's base colour, lightened for the second texture)."""
    num_colours = _num_colours(num_labels)
    palette = []
    for k in range(num_labels):
        r, g, b = _colour(k // 2, num_colours)
        if k % 2:
            r, g, b = (min(255, c + 60) for c in (r, g, b))
        palette.append((r, g, b))
    return palette


@dataclass(frozen=True)
class SyntheticScenes:
    """Generator of textured scenes with ``num_labels`` classes.

    Args:
        num_labels: number of classes ``K`` (≥ 2).
        image_size: ``(H, W)`` or an int for square scenes.
        seed: dataset seed; scene ``i`` of a split depends only on ``(seed, split, i)``.
    """

    num_labels: int = 8
    image_size: int | tuple[int, int] = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_labels < 2:
            raise ValueError(f"synthetic dataset needs num_labels >= 2, got {self.num_labels}")

    @property
    def size(self) -> tuple[int, int]:
        return (self.image_size, self.image_size) if isinstance(self.image_size, int) else tuple(self.image_size)

    @cached_property
    def class_appearance(self) -> list[dict]:
        """Per class: base colour (RGB floats), texture kind and its parameters (fixed by class id)."""
        rng = np.random.default_rng(10_000 + self.num_labels)  # same classes for any dataset seed
        num_colours = _num_colours(self.num_labels)
        classes = []
        for k in range(self.num_labels):
            texture = _TEXTURES[((k % 2) + 2 * ((k // 2) % 2)) % len(_TEXTURES)]
            classes.append(
                {
                    "colour": np.array(_colour(k // 2, num_colours), dtype=np.float32),
                    "texture": texture,
                    "angle": float(rng.uniform(0, np.pi)),
                    "period": float(rng.uniform(5.0, 11.0)),
                    "contrast": float(rng.uniform(35.0, 55.0)),
                }
            )
        return classes

    def _rng(self, split: str, index: int) -> np.random.Generator:
        if split not in _SPLIT_OFFSETS:
            raise ValueError(f"unknown split {split!r}; choose one of {sorted(_SPLIT_OFFSETS)}")
        return np.random.default_rng([self.seed, _SPLIT_OFFSETS[split], index])

    def _layout(self, rng: np.random.Generator) -> np.ndarray:
        """``(H, W)`` int class map: wavy Voronoi background plus shapes."""
        height, width = self.size
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        num_regions = int(rng.integers(2, 6))
        centres = rng.uniform([0, 0], [height, width], size=(num_regions, 2))
        region_classes = rng.integers(0, self.num_labels, size=num_regions)
        amplitude = 0.08 * min(height, width)
        freq = rng.uniform(0.02, 0.06, size=2) * 128 / max(height, width)
        phase = rng.uniform(0, 2 * np.pi, size=2)
        wy = yy + amplitude * np.sin(xx * freq[0] + phase[0])
        wx = xx + amplitude * np.sin(yy * freq[1] + phase[1])
        distances = (wy[None] - centres[:, 0, None, None]) ** 2 + (wx[None] - centres[:, 1, None, None]) ** 2
        label = region_classes[np.argmin(distances, axis=0)]
        for _ in range(int(rng.integers(1, 7))):
            cls = int(rng.integers(0, self.num_labels))
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            ry, rx = rng.uniform(0.06, 0.25) * height, rng.uniform(0.06, 0.25) * width
            kind = int(rng.integers(0, 3))
            if kind == 0:  # ellipse
                inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
            elif kind == 1:  # axis-aligned rectangle
                inside = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
            else:  # isosceles triangle pointing up
                top, bottom = cy - ry, cy + ry
                half = rx * (yy - top) / max(bottom - top, 1e-6)
                inside = (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half)
            label = np.where(inside, cls, label)
        return label.astype(np.int64)

    def _texture(self, appearance: dict, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``(H, W)`` float modulation in about [-1, 1] for one class."""
        angle, period = appearance["angle"], appearance["period"]
        u = xx * np.cos(angle) + yy * np.sin(angle)
        v = -xx * np.sin(angle) + yy * np.cos(angle)
        offset = rng.uniform(0, period)
        kind = appearance["texture"]
        if kind == "stripes":
            return np.sign(np.sin(2 * np.pi * (u + offset) / period))
        if kind == "checks":
            return np.sign(np.sin(2 * np.pi * (u + offset) / period) * np.sin(2 * np.pi * (v + offset) / period))
        if kind == "dots":
            return 2.0 * ((np.cos(2 * np.pi * (u + offset) / period) * np.cos(2 * np.pi * v / period)) > 0.5) - 1.0
        # blotches: smooth low-frequency noise (sum of a few random waves)
        out = np.zeros_like(xx)
        for _ in range(3):
            theta, scale, ph = rng.uniform(0, np.pi), rng.uniform(2.5, 5.0) * period, rng.uniform(0, 2 * np.pi)
            out += np.sin((xx * np.cos(theta) + yy * np.sin(theta)) / scale * 2 * np.pi + ph)
        return np.tanh(out)

    def generate(self, index: int, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """Scene ``index`` of ``split``.

        Returns:
            ``image`` ``uint8`` ``(H, W, 3)`` RGB and ``label`` ``uint8`` ``(H, W)`` with values in ``[0, K)``.
        """
        rng = self._rng(split, index)
        label = self._layout(rng)
        height, width = self.size
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        image = np.zeros((height, width, 3), dtype=np.float32)
        for cls in np.unique(label):
            appearance = self.class_appearance[int(cls)]
            modulation = self._texture(appearance, yy, xx, rng)
            where = label == cls
            colour = appearance["colour"] + rng.normal(0, 12, size=3)
            image[where] = colour + appearance["contrast"] * modulation[where, None]
        gain = rng.uniform(0.75, 1.25)
        cast = rng.normal(0, 10, size=3)
        gradient = rng.uniform(-25, 25) * (yy / height - 0.5) + rng.uniform(-25, 25) * (xx / width - 0.5)
        image = image * gain + cast + gradient[..., None] + rng.normal(0, 8, size=image.shape)
        return np.clip(image, 0, 255).astype(np.uint8), label.astype(np.uint8)


def load_synthetic(
    split: str = "train",
    num_labels: int = 8,
    num_samples: int = 1000,
    image_size: int | tuple[int, int] = 128,
    seed: int = 0,
):
    """The synthetic dataset as a map-style ``datasets.Dataset`` generated lazily on access.

    The underlying table holds only the ``index`` column; images are rendered when a row is read
    (``dataset.with_transform`` / ``set_transform``), so nothing is written to disk.

    Returns:
        ``datasets.Dataset`` with rows ``{"image": PIL RGB, "label": PIL "L" (class ids), "index": int}``.
    """
    import datasets
    from PIL import Image

    scenes = SyntheticScenes(num_labels=num_labels, image_size=image_size, seed=seed)

    def render(batch: dict) -> dict:
        images, labels = [], []
        for index in batch["index"]:
            image, label = scenes.generate(int(index), split)
            images.append(Image.fromarray(image, mode="RGB"))
            labels.append(Image.fromarray(label, mode="L"))
        return {"image": images, "label": labels, "index": list(batch["index"])}

    table = datasets.Dataset.from_dict({"index": list(range(num_samples))}, split=split)
    table = table.with_transform(render)
    return table
