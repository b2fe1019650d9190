"""Colouring label maps: dataset palettes, palette-mode PNGs, class statistics and image/prediction overlays.

* :func:`resolve_palette` picks the colours for a model: the palette of the benchmark whose class names the
  model carries (ADE20K, COCO-Stuff, Cityscapes, Pascal Context, from :mod:`offseg_hf.data.tables`; the
  synthetic dataset's colour-named classes in their own colours), else the palette of the benchmark with the
  same number of classes, else :func:`deterministic_palette`. Ground truth, predictions, overlays and legends
  all use that one palette.
* :func:`save_label_map` writes a label map as a palette-mode PNG: pixel values are class indices, viewers
  show the colours, ``np.array(Image.open(path))`` gives the indices back.
* :func:`class_fractions` counts the pixels of every class present.
* :func:`render_overlay` draws the image and the coloured prediction side by side with a legend of the classes
  present (matplotlib, no pyplot state) and returns the pixels; :func:`save_overlay` writes them as a PNG
  (``offseg predict``), ``offseg demo`` shows them in the page. :func:`overlay_layout` gives the exact geometry.
"""

from __future__ import annotations

import colorsys
import os
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from PIL import Image

__all__ = [
    "OverlayLayout",
    "class_fractions",
    "colorize",
    "deterministic_palette",
    "legend_colours",
    "overlay_layout",
    "render_overlay",
    "resolve_palette",
    "save_label_map",
    "save_overlay",
]


def deterministic_palette(num_labels: int) -> np.ndarray:
    """``(num_labels, 3)`` uint8 colours that are the same on every run: hues stepped by the golden ratio,
    alternating saturation/brightness so neighbouring indices differ clearly."""
    colours = []
    for index in range(num_labels):
        hue = (index * 0.618033988749895) % 1.0
        saturation = (0.55, 0.85, 0.7)[index % 3]
        value = (0.95, 0.75, 0.55)[(index // 3) % 3]
        colours.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value)])
    return np.asarray(colours, dtype=np.uint8).reshape(num_labels, 3)


def resolve_palette(id2label: Mapping[int, str]) -> tuple[np.ndarray, str | None]:
    """Colours for a model's classes.

    Args:
        id2label: ``{class index: name}`` of the model (``config.id2label``), indices ``0 .. K-1``.

    Returns:
        ``(palette, dataset)``: a ``(K, 3)`` uint8 array, and the benchmark name whose palette it is (``None``
        for the generated palette).
    """
    from offseg_hf.data.registry import get_dataset_info, identify_dataset, palette_array
    from offseg_hf.data.synthetic import synthetic_palette

    num_labels = len(id2label)
    dataset, _ = identify_dataset([id2label[index] for index in range(num_labels)])
    if dataset == "synthetic":  # the synthetic classes are named after their colours: show them in those colours
        return np.asarray(synthetic_palette(num_labels), dtype=np.uint8), "synthetic"
    if dataset is not None:
        return palette_array(get_dataset_info(dataset)), dataset
    return deterministic_palette(num_labels), None


def colorize(label_map: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """``(H, W)`` class indices → ``(H, W, 3)`` uint8 colours (indices beyond the palette are black)."""
    lookup = np.zeros((max(int(label_map.max(initial=0)) + 1, len(palette)), 3), dtype=np.uint8)
    lookup[: len(palette)] = palette
    return lookup[label_map]


def save_label_map(label_map: np.ndarray, palette: np.ndarray, path: str | os.PathLike) -> None:
    """Write ``(H, W)`` class indices as a PNG: palette mode (``P``) when the classes fit in 256 values,
    else 16-bit grey (``I;16``, no colours)."""
    label_map = np.asarray(label_map)
    if label_map.max(initial=0) < 256 and len(palette) <= 256:
        image = Image.fromarray(label_map.astype(np.uint8), mode="P")
        flat = np.zeros((256, 3), dtype=np.uint8)
        flat[: len(palette)] = palette
        image.putpalette(flat.reshape(-1).tolist())
    else:
        image = Image.fromarray(label_map.astype(np.uint16), mode="I;16")
    image.save(path, optimize=True)


def class_fractions(label_map: np.ndarray, id2label: Mapping[int, str]) -> list[dict]:
    """Classes present in a label map, largest first.

    Returns:
        One ``{"id", "label", "pixels", "fraction"}`` dict per class present; the fractions sum to 1.
    """
    label_map = np.asarray(label_map)
    counts = np.bincount(label_map.reshape(-1), minlength=len(id2label))
    total = int(counts.sum())
    present = [int(index) for index in np.flatnonzero(counts)]
    present.sort(key=lambda index: (-counts[index], index))
    return [
        {
            "id": index,
            "label": str(id2label.get(index, f"class {index}")),
            "pixels": int(counts[index]),
            "fraction": float(counts[index]) / total,
        }
        for index in present
    ]


@dataclass(frozen=True)
class OverlayLayout:
    """Pixel geometry of an overlay figure (origin top-left).

    Attributes:
        panel_size: ``(height, width)`` of each of the two panels (image, prediction).
        figure_size: ``(height, width)`` of the whole PNG.
        image_origin, prediction_origin: ``(top, left)`` of the two panels.
        legend_origin: ``(top, left)`` of the legend column.
        legend_entries: number of legend rows (classes shown, plus one "… more" row if some are left out).
    """

    panel_size: tuple[int, int]
    figure_size: tuple[int, int]
    image_origin: tuple[int, int]
    prediction_origin: tuple[int, int]
    legend_origin: tuple[int, int]
    legend_entries: int


MARGIN, TITLE_HEIGHT, GAP, LEGEND_WIDTH, LEGEND_ROW, MAX_LEGEND_CLASSES = 12, 28, 12, 300, 20, 25


def overlay_layout(height: int, width: int, num_classes: int, max_side: int = 1024, min_side: int = 256) -> OverlayLayout:
    """Layout of :func:`save_overlay` for an ``(height, width)`` image with ``num_classes`` classes present.

    Panels are the image scaled so its long side is at most ``max_side`` (and at least ``min_side``, so a 1×1
    image is still visible); each side is at least one pixel.
    """
    long_side = max(height, width)
    scale = min(1.0, max_side / long_side)
    if long_side * scale < min_side:
        scale = min_side / long_side
    panel = (max(1, round(height * scale)), max(1, round(width * scale)))
    entries = min(num_classes, MAX_LEGEND_CLASSES) + (1 if num_classes > MAX_LEGEND_CLASSES else 0)
    legend_height = 2 * LEGEND_ROW + LEGEND_ROW * entries
    content_height = max(TITLE_HEIGHT + panel[0], legend_height)
    figure = (content_height + 2 * MARGIN, 2 * MARGIN + 2 * panel[1] + 2 * GAP + LEGEND_WIDTH)
    top = MARGIN + TITLE_HEIGHT
    return OverlayLayout(
        panel_size=panel,
        figure_size=figure,
        image_origin=(top, MARGIN),
        prediction_origin=(top, MARGIN + panel[1] + GAP),
        legend_origin=(MARGIN, MARGIN + 2 * (panel[1] + GAP)),
        legend_entries=entries,
    )


def render_overlay(
    image: Image.Image,
    label_map: np.ndarray,
    palette: np.ndarray,
    fractions: list[dict],
    alpha: float = 0.5,
    title: str = "prediction",
    max_side: int = 1024,
    highlight: int | None = None,
) -> tuple[np.ndarray, OverlayLayout]:
    """Draw the image and the prediction blended over it, side by side, with a legend of the classes present.

    Args:
        image: the RGB image, ``(W, H)`` in PIL terms.
        label_map: ``(H, W)`` class indices.
        palette: ``(K, 3)`` uint8 colours.
        fractions: :func:`class_fractions` of ``label_map`` (legend order and percentages).
        alpha: weight of the class colours in the blend.
        title: heading of the prediction panel.
        max_side: long side of each panel.
        highlight: a class index to single out: only its pixels are coloured, the rest of the prediction
            panel shows the image darkened to half brightness (``None``: every class coloured).

    Returns:
        ``(pixels, layout)``: the ``figure_size`` ``(height, width, 3)`` uint8 figure and its
        :class:`OverlayLayout`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    label_map = np.asarray(label_map)
    if label_map.shape != (image.height, image.width):
        raise ValueError(f"label map of shape {label_map.shape} does not match the image size {image.height}×{image.width}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (overlay opacity) must be in [0, 1], got {alpha}")
    layout = overlay_layout(image.height, image.width, len(fractions), max_side=max_side)
    panel_h, panel_w = layout.panel_size
    shown = np.asarray(image.convert("RGB").resize((panel_w, panel_h), Image.Resampling.BILINEAR), dtype=np.float32)
    labels = np.asarray(Image.fromarray(label_map.astype(np.int32)).resize((panel_w, panel_h), Image.Resampling.NEAREST))
    blended = (1 - alpha) * shown + alpha * colorize(labels, palette).astype(np.float32)
    if highlight is not None:
        blended = np.where((labels == highlight)[..., None], blended, 0.5 * shown)

    fig_h, fig_w = layout.figure_size
    dpi = 100
    figure = Figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi, facecolor="white")
    canvas = FigureCanvasAgg(figure)
    for (top, left), pixels in ((layout.image_origin, shown), (layout.prediction_origin, blended)):
        # figimage places raw pixels (no resampling); its offset is the panel's lower-left corner
        figure.figimage(np.clip(pixels, 0, 255).astype(np.uint8), xo=left, yo=fig_h - top - panel_h, origin="upper")
    for (top, left), text in ((layout.image_origin, f"image ({image.width}×{image.height})"), (layout.prediction_origin, title)):
        figure.text(
            (left + panel_w / 2) / fig_w, (fig_h - top + TITLE_HEIGHT / 2) / fig_h, text,
            ha="center", va="center", fontsize=10, clip_on=False,
        )

    swatches = legend_colours(shown, labels, palette, [entry["id"] for entry in fractions[:MAX_LEGEND_CLASSES]], alpha)
    handles = [
        Patch(facecolor=swatch / 255, edgecolor="0.3", label=f"{_short(entry['label'])}  {100 * entry['fraction']:.1f}%")
        for entry, swatch in zip(fractions[:MAX_LEGEND_CLASSES], swatches)
    ]
    if len(fractions) > MAX_LEGEND_CLASSES:
        rest = sum(entry["fraction"] for entry in fractions[MAX_LEGEND_CLASSES:])
        handles.append(Patch(facecolor="white", edgecolor="white",
                             label=f"… {len(fractions) - MAX_LEGEND_CLASSES} more  {100 * rest:.1f}%"))
    top, left = layout.legend_origin
    figure.legend(
        handles=handles, loc="upper left", bbox_to_anchor=(left / fig_w, 1 - top / fig_h), frameon=False,
        fontsize=9, title="classes present", title_fontsize=10, alignment="left", handlelength=1.2,
        labelspacing=0.45, borderaxespad=0.0,
    )
    canvas.draw()
    pixels = np.array(canvas.buffer_rgba())[..., :3]
    return pixels, layout


def save_overlay(
    image: Image.Image,
    label_map: np.ndarray,
    palette: np.ndarray,
    fractions: list[dict],
    path: str | os.PathLike,
    alpha: float = 0.5,
    title: str = "prediction",
    max_side: int = 1024,
    highlight: int | None = None,
) -> OverlayLayout:
    """Save :func:`render_overlay` of the arguments as an RGB PNG at ``path``.

    Returns:
        The :class:`OverlayLayout` used (the PNG is exactly ``figure_size``).
    """
    pixels, layout = render_overlay(
        image, label_map, palette, fractions, alpha=alpha, title=title, max_side=max_side, highlight=highlight
    )
    Image.fromarray(pixels).save(path)
    return layout


def legend_colours(shown: np.ndarray, labels: np.ndarray, palette: np.ndarray, ids, alpha: float) -> np.ndarray:
    """``(len(ids), 3)`` float colours of the legend swatches: each class's colour *as it appears in the
    overlay*, i.e. the mean of ``(1 - alpha) · image + alpha · palette[id]`` over the class's pixels of the
    panel (over the whole panel for a class too small to survive the panel's resize).

    Args:
        shown: ``(h, w, 3)`` the image as drawn in the panel; labels: ``(h, w)`` class indices of the panel.
    """
    colours = colorize(np.asarray(ids, dtype=np.int64), palette).astype(np.float32).reshape(-1, 3)
    out = np.empty_like(colours)
    background = shown.reshape(-1, 3).mean(axis=0)
    for row, index in enumerate(ids):
        where = labels == index
        under = shown[where].mean(axis=0) if where.any() else background
        out[row] = (1 - alpha) * under + alpha * colours[row]
    return np.clip(out, 0, 255)


def _short(name: str, limit: int = 30) -> str:
    """First synonym of an ADE20K-style name ("wall, partition" → "wall"), cut to ``limit`` characters."""
    name = name.split(",")[0].strip() or name
    return name if len(name) <= limit else name[: limit - 1] + "…"
