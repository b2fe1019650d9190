"""The paper's test protocol as an API: keep-ratio resize, whole or sliding-window inference, multi-scale + flip.

OffSeg is evaluated with mmsegmentation's test pipeline. For one image of size ``(H, W)``:

1. **Resize, keep ratio.** ``Resize(scale=(2048, 512), keep_ratio=True)`` for ADE20K and COCO-Stuff: the
   short side becomes 512 unless the long side would exceed 2048 (:func:`rescale_size`; Cityscapes uses
   ``(2048, 1024)``, Pascal Context ``(520, 520)``).
2. **Logits on the resized image** ``(K, h, w)``:

   * ``whole``: one forward pass; the ``(K, h/4, w/4)`` logits are upsampled bilinearly to ``(h, w)``;
   * ``slide``: ``crop_size`` windows every ``stride`` pixels (the last window of a row/column is moved back
     to end at the border, :func:`slide_windows`); each window's logits are upsampled to the window size and
     the overlapping windows are averaged.
3. **Back to the image size.** Bilinear (``align_corners=False``) resize of the logits to ``(H, W)``, then the
   arg-max over classes.

**Mask2Former** (``model_type`` ``mask2former`` / ``mask2former_offset``, with or without offset learning) predicts
masks and their classes, not per-pixel logits. Its map in step 2 is the reference's ``Mask2FormerHead.predict``
(:func:`mask_classification_scores`): the network input is zero-padded at the bottom / right to a multiple of 32
(the reference's ``SegDataPreProcessor``), the last stage's mask logits are resized bilinearly to that padded size,
``softmax(class logits)`` without the no-object class times ``sigmoid(masks)`` is summed over the queries, and the
padding is cropped away. In ``slide`` mode every window is such an input of its own (the reference's
``slide_inference`` would resize each window's masks to the padded size of the whole image, a shape that does not
fit its window, so it has no usable sliding-window mode for Mask2Former).

With test-time augmentation (``tta=True``) steps 1–3 run for every scale ratio ``(0.5, 0.75, 1.0, 1.25,
1.5, 1.75)`` with and without a horizontal flip (the flipped logits are flipped back), and the **softmax
probabilities** of the 12 passes are averaged before the arg-max, as mmsegmentation's ``SegTTAModel`` does.

Memory stays bounded for large photos. The network only sees the resized image (at most 2048 pixels on the
long side, times 1.75 with TTA), and only the small per-pass logits are kept. Everything at a larger
resolution is computed lazily in bands of rows (``band_bytes`` per ``(K, rows, W)`` float32 band), so the
full-resolution ``(K, H, W)`` logits never exist: an 8000×6000 photo with 150 classes (27 GiB of logits) is
segmented with a few hundred MiB. The band-wise resizes reproduce ``F.interpolate(..., mode="bilinear",
align_corners=False)`` up to float rounding. Two more things keep large photos fast:

* the final arg-max only interpolates the classes that can win in each cell of the coarse map (a class whose
  largest corner value is below another class's smallest corner value cannot), usually one or two of K;
* with several passes (TTA), the softmax probabilities are averaged at the image size when it is no larger
  than the largest network input, else at that input size (``merge_resolution="auto"``), and the averaged
  probabilities are then resized to the image size; ``merge_resolution="original"`` averages at the image size
  whatever it costs, which is what mmsegmentation does.

Example:

```python
>>> from offseg_hf.inference.segment import segment
>>> results = segment(model, processor, [image], mode="slide", tta=True, protocol="ade20k")
>>> results[0].label_map.shape  # (H, W) of the original image
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from offseg_hf.data.registry import DATASETS, SegmentationProtocol, get_dataset

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

__all__ = [
    "MASK_CLASSIFICATION_MODEL_TYPES",
    "MASK_CLASSIFICATION_SIZE_DIVISOR",
    "PROTOCOLS",
    "SegmentationProtocol",
    "SegmentationResult",
    "get_protocol",
    "is_mask_classification",
    "mask_classification_label_map",
    "mask_classification_scores",
    "pad_to_multiple",
    "rescale_size",
    "resize_rows",
    "scaled_sizes",
    "segment",
    "segment_image",
    "slide_windows",
    "source_row_range",
]

DEFAULT_BAND_BYTES = 32 * 2**20
"""Default size of one ``(K, rows, width)`` float32 band evaluated at a time (32 MiB)."""

MASK_CLASSIFICATION_MODEL_TYPES = ("mask2former", "mask2former_offset")
"""``model_type`` of the mask-classification models (their semantic map is the reference's Mask2Former ``predict``)."""

MASK_CLASSIFICATION_SIZE_DIVISOR = 32
"""The reference pads Mask2Former's test inputs (after normalisation, with 0, bottom / right) to a multiple of this
(``SegDataPreProcessor(test_cfg=dict(size_divisor=32))``)."""

PROTOCOLS: dict[str, SegmentationProtocol] = {
    name: spec.protocol for name, spec in DATASETS.items() if spec.protocol is not None
}
"""The paper's benchmarks' test protocols (from :data:`offseg_hf.data.registry.DATASETS`)."""


def get_protocol(protocol: str | SegmentationProtocol) -> SegmentationProtocol:
    """A :class:`SegmentationProtocol` from a dataset name (aliases as in :func:`offseg_hf.data.registry.get_dataset`)
    or itself."""
    if isinstance(protocol, SegmentationProtocol):
        return protocol
    try:
        spec = get_dataset(protocol)
    except ValueError:
        spec = None
    if spec is None or spec.protocol is None:
        raise ValueError(f"unknown test protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    return spec.protocol


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """Output ``(height, width)`` of a keep-ratio resize into ``scale`` (mmcv ``imrescale`` rounding).

    The factor is ``min(max(scale) / max(H, W), min(scale) / min(H, W))``: the short side reaches
    ``min(scale)`` unless the long side would exceed ``max(scale)``. Sides are rounded half up and are at
    least 1 (extreme strips such as 20000×5 would otherwise shrink to 0).
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def scaled_sizes(
    height: int,
    width: int,
    protocol: SegmentationProtocol,
    ratios: Sequence[float] = (1.0,),
    ratio_base: Literal["protocol", "image"] = "protocol",
) -> list[tuple[int, int]]:
    """Network input size ``(h, w)`` for each scale ratio.

    Args:
        height, width: original image size.
        protocol: gives the base ``scale``.
        ratios: scale ratios (``1.0`` alone without multi-scale testing).
        ratio_base: ``"protocol"`` multiplies the protocol scale, ``(int(2048 r), int(512 r))``, as
            mmsegmentation 0.x's ``MultiScaleFlipAug`` does: an 8000×6000 photo is tested at short sides
            256…896. ``"image"`` multiplies the original image size, as mmsegmentation 1.x's ``tta_pipeline``
            (``Resize(scale_factor=r, keep_ratio=True)`` without the base resize) does; both agree for images
            already at the protocol scale.
    """
    sizes = []
    for ratio in ratios:
        if ratio_base == "protocol":
            scale = (int(protocol.scale[0] * ratio), int(protocol.scale[1] * ratio))
        elif ratio_base == "image":
            scale = (int(width * ratio + 0.5), int(height * ratio + 0.5))
        else:
            raise ValueError(f"ratio_base must be 'protocol' or 'image', got {ratio_base!r}")
        sizes.append(rescale_size(height, width, scale))
    return sizes


def slide_windows(
    height: int, width: int, crop_size: tuple[int, int], stride: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """Sliding-window boxes ``(top, bottom, left, right)`` covering an ``(height, width)`` image.

    Windows start every ``stride`` pixels; one that would cross the border is moved back to end at it, and
    windows are clipped to the image when it is smaller than ``crop_size`` (mmsegmentation ``slide_inference``).
    """
    crop_h, crop_w = crop_size
    stride_h, stride_w = stride
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    boxes = []
    for row in range(rows):
        for col in range(cols):
            bottom = min(row * stride_h + crop_h, height)
            right = min(col * stride_w + crop_w, width)
            boxes.append((max(bottom - crop_h, 0), bottom, max(right - crop_w, 0), right))
    return boxes


# --------------------------------------------------------------------------------------------------------------
# Band-wise evaluation of (K, H, W) maps


def _linear_taps(in_size: int, out_size: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices ``i0, i1`` and weight ``w1`` of output positions ``start..stop-1`` for a bilinear
    ``align_corners=False`` resize ``in_size → out_size`` (PyTorch's formula, float32):
    ``src = max((dst + 0.5) * in/out - 0.5, 0)``, ``out = (1 - w1) * in[i0] + w1 * in[i1]``."""
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    source = ((torch.arange(start, stop, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_(min=0)
    index0 = source.floor().long().clamp_(max=in_size - 1)
    weight1 = (source - index0).clamp_(0, 1)
    index1 = torch.where(index0 < in_size - 1, index0 + 1, index0)
    return index0, index1, weight1


def resize_rows(
    source_rows: torch.Tensor, source_start: int, in_height: int, out_size: tuple[int, int], start: int, stop: int
) -> torch.Tensor:
    """Rows ``start..stop-1`` of the bilinear (``align_corners=False``) resize of a ``(K, in_height, w)`` map to ``out_size``.

    Args:
        source_rows: ``(K, r, w)``, rows ``source_start .. source_start + r - 1`` of the source map; they must
            include every row the requested output rows read (see :func:`source_row_range`).
        source_start: index of the first row of ``source_rows`` in the full source map.
        in_height: height of the full source map.
        out_size: ``(H, W)`` of the full resized map.
        start, stop: output rows to compute.

    Returns:
        ``(K, stop - start, W)``, equal to ``F.interpolate(source[None], out_size, mode="bilinear",
        align_corners=False)[0, :, start:stop]`` up to float rounding.
    """
    out_height, out_width = out_size
    index0, index1, weight1 = _linear_taps(in_height, out_height, start, stop)
    index0, index1 = index0 - source_start, index1 - source_start
    if index0.min() < 0 or index1.max() >= source_rows.shape[1]:
        raise ValueError(
            f"resize_rows: output rows {start}..{stop - 1} need source rows {int(index0.min()) + source_start}.."
            f"{int(index1.max()) + source_start}, got rows {source_start}..{source_start + source_rows.shape[1] - 1}"
        )
    weight1 = weight1.to(source_rows)[None, :, None]
    rows = source_rows[:, index0] * (1 - weight1) + source_rows[:, index1] * weight1
    if rows.shape[-1] != out_width:
        # same row count: the vertical pass of F.interpolate is an exact copy, the horizontal one is PyTorch's own.
        rows = F.interpolate(rows[None], size=(stop - start, out_width), mode="bilinear", align_corners=False)[0]
    return rows


def source_row_range(in_height: int, out_height: int, start: int, stop: int) -> tuple[int, int]:
    """Half-open range of source rows that output rows ``start..stop-1`` of a bilinear resize read."""
    index0, index1, _ = _linear_taps(in_height, out_height, start, stop)
    return int(index0.min()), int(index1.max()) + 1


class _Field:
    """A ``(num_channels, height, width)`` float map that is computed on demand, a band of rows at a time."""

    num_channels: int
    height: int
    width: int

    @property
    def device(self) -> torch.device:
        """Where its rows are computed (the network's device)."""
        return self.source.device

    def rows(self, start: int, stop: int) -> torch.Tensor:  # pragma: no cover - interface
        """Rows ``start..stop-1``: a ``(num_channels, stop - start, width)`` tensor (may be a view: do not modify)."""
        raise NotImplementedError


class _TensorField(_Field):
    """A map held in memory (the small logits of one forward pass)."""

    def __init__(self, values: torch.Tensor):
        self.values = values
        self.num_channels, self.height, self.width = values.shape

    @property
    def device(self) -> torch.device:
        return self.values.device

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.values[:, start:stop]


class _ResizedField(_Field):
    """Bilinear (``align_corners=False``) resize of another field, evaluated in chunks of at most ``band_bytes``."""

    def __init__(self, source: _Field, height: int, width: int, band_bytes: int = DEFAULT_BAND_BYTES):
        self.source, self.height, self.width = source, height, width
        self.num_channels = source.num_channels
        ratio = max(1.0, source.height / height)
        row_bytes = 4 * self.num_channels * max(width, source.width)
        self.chunk_rows = max(1, int((band_bytes // row_bytes - 2) / ratio))

    def rows(self, start: int, stop: int) -> torch.Tensor:
        source = self.source
        if (source.height, source.width) == (self.height, self.width):
            return source.rows(start, stop)
        chunks = []
        for chunk_start in range(start, stop, self.chunk_rows):
            chunk_stop = min(stop, chunk_start + self.chunk_rows)
            first, last = source_row_range(source.height, self.height, chunk_start, chunk_stop)
            chunks.append(
                resize_rows(
                    source.rows(first, last), first, source.height, (self.height, self.width), chunk_start, chunk_stop
                )
            )
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)


class _FlippedField(_Field):
    """Left-right mirror of another field (undoes a horizontal-flip augmentation)."""

    def __init__(self, source: _Field):
        self.source = source
        self.num_channels, self.height, self.width = source.num_channels, source.height, source.width

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.source.rows(start, stop).flip(-1)


class _SlideField(_Field):
    """Average of overlapping windows' maps, each at its window's size (mmsegmentation ``slide_inference``)."""

    def __init__(self, boxes: list[tuple[int, int, int, int]], window_fields: list[_Field], height: int, width: int):
        self.height, self.width = height, width
        self.num_channels = window_fields[0].num_channels
        self.windows = [(*box, field) for box, field in zip(boxes, window_fields)]

    @property
    def device(self) -> torch.device:
        return self.windows[0][-1].device

    def rows(self, start: int, stop: int) -> torch.Tensor:
        total = torch.zeros((self.num_channels, stop - start, self.width), dtype=torch.float32, device=self.device)
        count = torch.zeros((stop - start, self.width), dtype=torch.float32, device=self.device)
        for top, bottom, left, right, field in self.windows:
            lo, hi = max(start, top), min(stop, bottom)
            if lo >= hi:
                continue
            total[:, lo - start : hi - start, left:right] += field.rows(lo - top, hi - top)
            count[lo - start : hi - start, left:right] += 1
        if (count == 0).any():
            raise RuntimeError(f"sliding windows leave pixels of rows {start}..{stop - 1} uncovered")
        return total / count


class _MeanSoftmaxField(_Field):
    """Mean over fields of the softmax over classes (mmsegmentation ``SegTTAModel.merge_preds``)."""

    def __init__(self, fields: list[_Field]):
        self.fields = fields
        self.num_channels, self.height, self.width = fields[0].num_channels, fields[0].height, fields[0].width

    @property
    def device(self) -> torch.device:
        return self.fields[0].device

    def rows(self, start: int, stop: int) -> torch.Tensor:
        total = None
        for field in self.fields:
            probabilities = field.rows(start, stop).softmax(dim=0)
            total = probabilities if total is None else total.add_(probabilities)
        return total.div_(len(self.fields))


class _MaskClassificationField(_Field):
    """Semantic scores of a mask-classification model (Mask2Former), as the reference's ``Mask2FormerHead.predict``.

    ``scores[k] = Σ_q softmax(class_logits[q])[k] · sigmoid(masks[q])``: the softmax runs over all K + 1 classes and
    the no-object class is then dropped (no renormalisation); the ``(Q, h, w)`` mask logits are resized bilinearly
    (``align_corners=False``) to the padded network input ``padded_size`` *before* the sigmoid and the product,
    and the result is cropped to the unpadded input ``(height, width)`` (``EncoderDecoder.postprocess_result``).
    Rows are computed on demand, so the ``(Q, H, W)`` resized masks never exist at once.
    """

    def __init__(
        self,
        class_logits: torch.Tensor,
        mask_logits: torch.Tensor,
        padded_size: tuple[int, int],
        height: int,
        width: int,
        band_bytes: int = DEFAULT_BAND_BYTES,
    ):
        padded_height, padded_width = int(padded_size[0]), int(padded_size[1])
        if height > padded_height or width > padded_width:
            raise ValueError(f"input size {(height, width)} is larger than the padded size {(padded_height, padded_width)}")
        self.class_probabilities = class_logits.float().softmax(dim=-1)[:, :-1]  # (Q, K), no-object dropped
        self.masks = mask_logits.float()  # (Q, h, w)
        self.padded_size = (padded_height, padded_width)
        self.num_channels, self.height, self.width = self.class_probabilities.shape[1], height, width
        num_queries = self.masks.shape[0]
        self.chunk_rows = max(1, band_bytes // (4 * max(num_queries, self.num_channels) * padded_width))

    @property
    def device(self) -> torch.device:
        return self.masks.device

    def rows(self, start: int, stop: int) -> torch.Tensor:
        chunks = []
        for first in range(start, stop, self.chunk_rows):
            last = min(stop, first + self.chunk_rows)
            masks = resize_rows(self.masks, 0, self.masks.shape[1], self.padded_size, first, last)[..., : self.width]
            chunks.append(torch.einsum("qk,qhw->khw", self.class_probabilities, masks.sigmoid()))
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)


def mask_classification_scores(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    padded_size: tuple[int, int],
    input_size: tuple[int, int],
    *,
    band_bytes: int = DEFAULT_BAND_BYTES,
) -> torch.Tensor:
    """The reference's semantic scores ``(K, H_in, W_in)`` (float32, CPU) of one image from a mask-classification
    model's last-stage outputs (``Mask2FormerHead.predict`` + the crop of ``postprocess_result``).

    Args:
        class_logits: ``(Q, K + 1)`` class logits of the queries (last = no-object).
        mask_logits: ``(Q, h, w)`` mask logits (Mask2Former: 1/4 of the padded input).
        padded_size: ``(H_pad, W_pad)`` of the network input (the image padded to a multiple of 32).
        input_size: ``(H_in, W_in)`` of the image inside that input (before the padding).
    """
    return _materialise(_MaskClassificationField(class_logits, mask_logits, padded_size, *input_size, band_bytes),
                        band_bytes)


def mask_classification_label_map(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    padded_size: tuple[int, int],
    input_size: tuple[int, int],
    output_size: tuple[int, int] | None = None,
    *,
    return_scores: bool = False,
    band_bytes: int = DEFAULT_BAND_BYTES,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference's semantic prediction of one image: the scores of :func:`mask_classification_scores` resized
    bilinearly (``align_corners=False``) to ``output_size`` (the original image size; default ``input_size``), then
    the arg-max, band by band.

    Returns:
        ``(label_map, scores)``: the ``(H, W)`` int64 arg-max and, with ``return_scores``, the ``(K, H, W)`` float32
        scores at ``output_size`` (else ``None``).
    """
    field: _Field = _MaskClassificationField(class_logits, mask_logits, padded_size, *input_size, band_bytes)
    height, width = output_size if output_size is not None else input_size
    label_map = _argmax_resized(field, int(height), int(width), band_bytes)
    scores = _materialise(_ResizedField(field, int(height), int(width), band_bytes), band_bytes) if return_scores else None
    return label_map, scores


def is_mask_classification(model) -> bool:
    """Whether ``model`` predicts masks and their classes (Mask2Former, with or without offset learning) rather than
    per-pixel logits; :func:`segment_image` then runs the reference's Mask2Former ``predict``."""
    return getattr(getattr(model, "config", None), "model_type", None) in MASK_CLASSIFICATION_MODEL_TYPES


def _materialise(field: _Field, band_bytes: int) -> torch.Tensor:
    """The whole ``(K, height, width)`` map of a field, computed band by band."""
    out = None
    rows = max(1, band_bytes // (4 * field.num_channels * field.width))
    for start in range(0, field.height, rows):
        values = field.rows(start, min(field.height, start + rows))
        if out is None:
            out = torch.empty((field.num_channels, field.height, field.width), dtype=values.dtype, device="cpu")
        out[:, start : start + values.shape[1]] = values.cpu()
    return out


def _candidate_argmax(
    source: torch.Tensor,
    row_taps: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    col_taps: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    source_start: int,
    band_bytes: int,
) -> torch.Tensor:
    """Arg-max over classes of a bilinear upsampling, computing only the classes that can win.

    Every output pixel is a convex combination of the four corners of its source cell. A class whose
    largest corner value is below ``tau = max_c min_corners(value_c)`` can never be the arg-max inside
    that cell, so only the remaining candidates (typically 1–3 of K) are interpolated. Ties go to the
    smallest class index, as ``torch.argmax`` does.

    Args:
        source: ``(K, r, w)`` source rows ``source_start ..``.
        row_taps, col_taps: :func:`_linear_taps` of the output rows and of all output columns.
        band_bytes: memory budget of the ``(candidates, rows, W)`` temporaries.

    Returns:
        ``(rows, W)`` int64 labels, or ``None`` when the candidates are too many to be worth it.
    """
    num_labels, _, source_width = source.shape
    row0, row1, weight_y = row_taps
    col0, _, weight_x = col_taps
    cell_rows, inverse = torch.unique(row0, return_inverse=True)
    next_rows = row1[torch.searchsorted(row0, cell_rows)]
    top = source.index_select(1, cell_rows - source_start)
    bottom = source.index_select(1, next_rows - source_start)
    # largest / smallest corner value of every class in every cell (K, cells_y, w); the last column's right
    # neighbour is itself (edge clamp)
    vertical_max, vertical_min = torch.maximum(top, bottom), torch.minimum(top, bottom)
    upper, lower = vertical_max.clone(), vertical_min.clone()
    torch.maximum(vertical_max[..., :-1], vertical_max[..., 1:], out=upper[..., :-1])
    torch.minimum(vertical_min[..., :-1], vertical_min[..., 1:], out=lower[..., :-1])
    del vertical_max, vertical_min
    threshold = lower.amax(dim=0, keepdim=True)
    del lower
    cell_counts = (upper >= threshold).sum(dim=0)  # candidates per cell (cells_y, w)
    count = int(cell_counts.max())
    if 2 * count >= num_labels:
        return None
    # the candidates of a cell are its `count_cell <= count` classes of largest corner maximum; the extra slots
    # hold classes that cannot win. Ascending class order keeps torch.argmax's tie-breaking.
    ranked = torch.topk(upper, count, dim=0, sorted=True).indices  # (C, cells_y, w)
    del upper
    only_candidate = ranked[0]  # the label of every pixel of a cell with a single candidate
    slots = ranked.sort(dim=0).values
    ys = torch.arange(slots.shape[1], device=source.device)[None, :, None]
    xs = torch.arange(source_width, device=source.device)[None, None, :]
    next_xs = torch.clamp(xs + 1, max=source_width - 1)
    # candidate values at the four corners of each cell: (C, cells_y, w) each
    corners = [top[slots, ys, xs], top[slots, ys, next_xs], bottom[slots, ys, xs], bottom[slots, ys, next_xs]]
    del top, bottom
    contested = cell_counts > 1

    rows, width = row0.numel(), col0.numel()
    chunk = max(1, band_bytes // (4 * width * count * 6))
    labels = torch.empty((rows, width), dtype=torch.int64, device=source.device)
    for first in range(0, rows, chunk):
        last = min(rows, first + chunk)
        cell_y, cell_x = inverse[first:last, None], col0[None, :]
        labels[first:last] = only_candidate[cell_y, cell_x]
        pixel_y, pixel_x = contested[cell_y, cell_x].nonzero(as_tuple=True)
        if pixel_y.numel() == 0:
            continue
        cy, cx = inverse[first + pixel_y], col0[pixel_x]
        c00, c01, c10, c11 = (values[:, cy, cx] for values in corners)  # (C, N)
        wx1 = weight_x[pixel_x].to(source)
        scores = torch.lerp(torch.lerp(c00, c01, wx1), torch.lerp(c10, c11, wx1), weight_y[first + pixel_y].to(source))
        best = scores.argmax(dim=0, keepdim=True)
        labels[first + pixel_y, pixel_x] = slots[:, cy, cx].gather(0, best)[0]
    return labels


def _argmax_resized(source: _Field, height: int, width: int, band_bytes: int) -> torch.Tensor:
    """``(height, width)`` int64 arg-max over classes of ``source`` resized bilinearly to ``(height, width)``."""
    num_labels = source.num_channels
    label_map = torch.empty((height, width), dtype=torch.int64)
    if (source.height, source.width) == (height, width):
        rows = max(1, band_bytes // (4 * num_labels * width))
        for start in range(0, height, rows):
            stop = min(height, start + rows)
            label_map[start:stop] = source.rows(start, stop).argmax(dim=0).cpu()
        return label_map

    dense = _ResizedField(source, height, width, band_bytes)
    col_taps = tuple(t.to(source.device) for t in _linear_taps(source.width, width, 0, width))
    source_rows = max(3, band_bytes // (4 * num_labels * source.width))
    rows = max(1, min(band_bytes // (4 * width * 16), int((source_rows - 2) * height / source.height)))
    for start in range(0, height, rows):
        stop = min(height, start + rows)
        row_taps = tuple(t.to(col_taps[0].device) for t in _linear_taps(source.height, height, start, stop))
        first, last = int(row_taps[0].min()), int(row_taps[1].max()) + 1
        labels = None
        if height * width >= 4 * source.height * source.width:  # pruning pays off for large upsampling factors
            labels = _candidate_argmax(source.rows(first, last), row_taps, col_taps, first, band_bytes)
        if labels is None:  # too many candidates: interpolate every class
            dense_rows = max(1, band_bytes // (4 * num_labels * width))
            labels = torch.cat(
                [
                    dense.rows(a, min(stop, a + dense_rows)).argmax(dim=0)
                    for a in range(start, stop, dense_rows)
                ]
            )
        label_map[start:stop] = labels.cpu()
    return label_map


# --------------------------------------------------------------------------------------------------------------
# Running the model


@dataclass
class SegmentationResult:
    """Prediction for one image.

    Attributes:
        label_map: ``(H, W)`` ``torch.int64`` class indices at the original image size.
        probabilities: ``(K, H, W)`` float32 class probabilities (softmax, averaged over the test-time
            augmentations), only when requested.
    """

    label_map: torch.Tensor
    probabilities: torch.Tensor | None = None


def _as_chw_uint8(image) -> torch.Tensor:
    """An image as a ``(3, H, W)`` tensor with values 0–255.

    PIL images (any mode, see :func:`offseg_hf.inference.image_io.to_rgb`); NumPy arrays ``(H, W)`` or ``(H, W, C)`` (the
    PIL layout); tensors ``(C, H, W)`` (the torch layout, ``(H, W, C)`` accepted when unambiguous). One channel is
    repeated, a fourth (alpha) channel dropped.
    """
    from PIL import Image as PILImage

    if isinstance(image, PILImage.Image):
        from offseg_hf.inference.image_io import to_rgb

        return torch.from_numpy(np.array(to_rgb(image))).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(image))
        if tensor.ndim == 3:
            tensor = tensor.permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        tensor = image
        if tensor.ndim == 3 and tensor.shape[0] not in (1, 3, 4) and tensor.shape[-1] in (1, 3, 4):
            tensor = tensor.permute(2, 0, 1)
    else:
        raise TypeError(f"expected a PIL image, NumPy array or torch tensor, got {type(image).__name__}")
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
        layout = "(H, W[, C])" if isinstance(image, np.ndarray) else "(C, H, W)"
        raise ValueError(
            f"expected an image of shape {layout} with 1, 3 or 4 channels, got shape {tuple(image.shape)}"
        )
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    return tensor[:3].contiguous()  # alpha dropped, as for files


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of a module's parameters; CPU float32 for a network that is not a module (an ONNX Runtime
    session, :class:`offseg_hf.deploy.onnx_runtime.OnnxSegmenter`)."""
    parameters = model.parameters if isinstance(model, torch.nn.Module) else None
    parameter = next(parameters(), None) if parameters is not None else None
    if parameter is None:
        return torch.device("cpu"), torch.float32
    return parameter.device, parameter.dtype


def _normalised(processor, image: torch.Tensor, size: tuple[int, int], device, dtype) -> torch.Tensor:
    """``(1, 3, h, w)`` network input: ``image (3, H, W)`` resized to ``size`` and normalised by ``processor``."""
    resize = tuple(image.shape[-2:]) != tuple(size)
    pixel_values = processor(
        images=image,
        do_resize=resize,
        size={"height": size[0], "width": size[1]},
        do_pad=False,  # a mask-classification processor's own padding: the protocol pads (and crops) itself
        input_data_format="channels_first",
        return_tensors="pt",
    )["pixel_values"]
    if pixel_values.shape[0] != 1 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[-2:]) != tuple(size):
        raise ValueError(
            f"{type(processor).__name__} returned pixel_values of shape {tuple(pixel_values.shape)}, expected "
            f"(1, 3, {size[0]}, {size[1]})"
        )
    return pixel_values.to(device=device, dtype=dtype)


def _logits(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """``(B, K, h, w)`` float32 logits of ``model(pixel_values=...)``: an output with ``logits``, a tuple whose first
    item they are, or the logits themselves (a tensor or a NumPy array, as an ONNX Runtime network returns them)."""
    outputs = model(pixel_values=pixel_values)
    if hasattr(outputs, "logits"):
        logits = outputs.logits
    elif isinstance(outputs, (tuple, list)):
        logits = outputs[0]
    else:
        logits = outputs
    logits = torch.as_tensor(logits)
    if logits.ndim != 4 or logits.shape[0] != pixel_values.shape[0]:
        raise ValueError(
            f"{type(model).__name__} returned logits of shape {tuple(logits.shape)} for pixel_values "
            f"{tuple(pixel_values.shape)}; expected (batch, num_labels, h, w)"
        )
    return logits.float()


def _network_fields(model, pixel_values: torch.Tensor, size_divisor: int, band_bytes: int) -> list[_Field]:
    """One map per image of the batch ``pixel_values (B, 3, h, w)``, at ``(h, w)``: the logits upsampled to the
    network input (``decode_head.predict``), or for a mask-classification model the reference's semantic scores of
    the input zero-padded to a multiple of ``size_divisor`` and cropped back (``Mask2FormerHead.predict``)."""
    height, width = pixel_values.shape[-2:]
    if not is_mask_classification(model):
        return [_ResizedField(_TensorField(logits), height, width, band_bytes) for logits in _logits(model, pixel_values)]
    padded = pad_to_multiple(pixel_values, size_divisor)
    outputs = model(pixel_values=padded)
    return [
        _MaskClassificationField(class_logits, mask_logits, padded.shape[-2:], height, width, band_bytes)
        for class_logits, mask_logits in zip(outputs.class_queries_logits, outputs.masks_queries_logits)
    ]


def pad_to_multiple(pixel_values: torch.Tensor, size_divisor: int) -> torch.Tensor:
    """``(B, C, h, w)`` zero-padded at the bottom / right to multiples of ``size_divisor`` (itself when they are)."""
    height, width = pixel_values.shape[-2:]
    pad_bottom, pad_right = -height % size_divisor, -width % size_divisor
    if not (pad_bottom or pad_right):
        return pixel_values
    return F.pad(pixel_values, (0, pad_right, 0, pad_bottom))


def _whole_field(model, pixel_values: torch.Tensor, size_divisor: int, band_bytes: int) -> _Field:
    """Whole-image map at the network input size."""
    return _network_fields(model, pixel_values, size_divisor, band_bytes)[0]


def _slide_field(
    model, pixel_values: torch.Tensor, protocol: SegmentationProtocol, batch_size: int, size_divisor: int,
    band_bytes: int,
) -> _Field:
    """Sliding-window maps averaged at the network input size (``slide_inference``); each window is one image."""
    height, width = pixel_values.shape[-2:]
    boxes = slide_windows(height, width, protocol.crop_size, protocol.stride)
    window_fields: list[_Field] = []
    for first in range(0, len(boxes), batch_size):
        batch = torch.cat([pixel_values[..., t:b, l:r] for t, b, l, r in boxes[first : first + batch_size]])
        window_fields.extend(_network_fields(model, batch, size_divisor, band_bytes))
    return _SlideField(boxes, window_fields, height, width)


@torch.inference_mode()
def segment_image(
    model: "torch.nn.Module | Callable",
    processor,
    image: "Image.Image | np.ndarray | torch.Tensor",
    *,
    mode: Literal["whole", "slide"] = "whole",
    tta: bool = False,
    protocol: str | SegmentationProtocol = "ade20k",
    ratios: Sequence[float] | None = None,
    flip: bool | None = None,
    ratio_base: Literal["protocol", "image"] = "protocol",
    return_probabilities: bool = False,
    merge_resolution: Literal["auto", "original"] = "auto",
    crop_batch_size: int = 4,
    band_bytes: int = DEFAULT_BAND_BYTES,
) -> SegmentationResult:
    """Segment one image with the paper's test protocol.

    Args:
        model: a semantic-segmentation model called as ``model(pixel_values=...)`` whose output has
            ``logits (B, K, h, w)`` at any fixed fraction of the input size (OffSeg: a quarter), or a Mask2Former
            (``class_queries_logits``, ``masks_queries_logits``; see the module docstring). Put it in eval
            mode first; it runs on its own device. Any other callable network works too (it gets CPU float32
            ``pixel_values`` and returns the logits as a tensor or NumPy array, or an output with ``logits``):
            :class:`offseg_hf.deploy.onnx_runtime.OnnxSegmenter` runs an exported ONNX file through this same
            resize / slide / TTA logic.
        processor: the model's image processor (for OffSeg folders a ``SegformerImageProcessor``, see
            :func:`offseg_hf.build_image_processor`); only its resize and normalisation are used, with the sizes
            this function chooses (mmcv's rounding, :func:`rescale_size`).
        image: PIL image (any mode, see :func:`offseg_hf.inference.image_io.to_rgb`), or an ``(H, W, 3)`` / ``(3, H, W)``
            uint8 array or tensor.
        mode: ``"whole"`` (one pass on the resized image) or ``"slide"`` (sliding windows; the paper's setting).
        tta: multi-scale (``protocol.tta_ratios``) + horizontal-flip testing.
        protocol: a dataset name (``"ade20k"``, ``"coco-stuff"``, ``"cityscapes"``, ``"pascal-context"``) or a
            :class:`SegmentationProtocol`.
        ratios, flip: override the scale ratios / the flip of ``tta``.
        ratio_base: what the ratios multiply, see :func:`scaled_sizes`.
        return_probabilities: also return the mean softmax probabilities, ``(K, h, w)`` at the merge resolution.
        merge_resolution: where the softmax of several passes (TTA) is averaged. ``"original"``: at the image
            size, exactly as the reference (cost ``passes × K × H × W``). ``"auto"`` (default): at the image size
            when it is no larger than the largest network input, else at that input size (keep ratio), which
            bounds the cost for large photos; the averaged probabilities are then resized to the image size
            before the arg-max. A single pass without probabilities never merges: its logits are resized
            straight to the image size.
        crop_batch_size: sliding windows per forward pass.
        band_bytes: size of the ``(K, rows, W)`` float32 bands the original-resolution work is split into.

    Returns:
        :class:`SegmentationResult` with the ``(H, W)`` label map of the original image.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if merge_resolution not in ("auto", "original"):
        raise ValueError(f"merge_resolution must be 'auto' or 'original', got {merge_resolution!r}")
    protocol = get_protocol(protocol)
    ratios = tuple(ratios) if ratios is not None else (protocol.tta_ratios if tta else (1.0,))
    flips = (False, True) if (flip if flip is not None else tta) else (False,)
    pixels = _as_chw_uint8(image)
    height, width = pixels.shape[-2:]
    device, dtype = _model_device_dtype(model)
    size_divisor = getattr(processor, "size_divisor", None) or MASK_CLASSIFICATION_SIZE_DIVISOR

    sizes = scaled_sizes(height, width, protocol, ratios, ratio_base)
    fields: list[_Field] = []
    for size in sizes:
        pixel_values = _normalised(processor, pixels, size, device, dtype)
        for flipped in flips:
            inputs = pixel_values.flip(-1) if flipped else pixel_values
            if mode == "whole":
                field = _whole_field(model, inputs, size_divisor, band_bytes)
            else:
                field = _slide_field(model, inputs, protocol, crop_batch_size, size_divisor, band_bytes)
            fields.append(_FlippedField(field) if flipped else field)

    merge_size = _merge_size(height, width, sizes, merge_resolution)
    probabilities_field = None
    if len(fields) > 1 or return_probabilities:
        probabilities_field = _MeanSoftmaxField([_ResizedField(f, *merge_size, band_bytes) for f in fields])
    # One pass: the logits themselves (exact reference arithmetic); several: their mean probabilities.
    label_source = fields[0] if len(fields) == 1 else probabilities_field
    label_map = _argmax_resized(label_source, height, width, band_bytes)
    probabilities = _materialise(probabilities_field, band_bytes) if return_probabilities else None
    return SegmentationResult(label_map=label_map, probabilities=probabilities)


def _merge_size(
    height: int, width: int, sizes: list[tuple[int, int]], merge_resolution: Literal["auto", "original"]
) -> tuple[int, int]:
    """Resolution at which the softmax of several passes is averaged (see :func:`segment_image`)."""
    if merge_resolution == "original":
        return height, width
    if merge_resolution != "auto":
        raise ValueError(f"merge_resolution must be 'auto' or 'original', got {merge_resolution!r}")
    largest = max(sizes, key=lambda size: size[0] * size[1])
    return (height, width) if height * width <= largest[0] * largest[1] else largest


def segment(
    model: torch.nn.Module,
    processor,
    images,
    *,
    progress: bool = False,
    **kwargs,
) -> list[SegmentationResult]:
    """Segment several images (a list, or a single image) with :func:`segment_image`; ``kwargs`` go to it.

    Args:
        progress: show a tqdm progress bar over the images.

    Returns:
        One :class:`SegmentationResult` per image, in order.
    """
    from PIL import Image as PILImage

    if isinstance(images, (PILImage.Image, np.ndarray, torch.Tensor)) and not (
        isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4
    ):
        images = [images]
    iterator = images
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(images, desc="segment", unit="image")
    return [segment_image(model, processor, image, **kwargs) for image in iterator]
