"""Streaming semantic-segmentation metrics: mIoU, mAcc, aAcc and per-class IoU / accuracy.

The definitions are those of mmsegmentation's ``IoUMetric`` (the code the OffSeg paper reports with):

* pixels whose label is ``ignore_index`` (255) are dropped before counting;
* intersections, unions, prediction and label areas are summed over the **whole dataset**
  (not averaged per image);
* ``IoU[k] = intersect[k] / union[k]`` and ``Acc[k] = intersect[k] / label_area[k]``; a ratio whose
  denominator is 0 is NaN, so a class absent from both prediction and ground truth has IoU NaN,
  and a class absent from the ground truth has accuracy NaN (its IoU is 0 if it was predicted);
* ``mIoU`` and ``mAcc`` are ``nanmean`` over classes, ``aAcc = sum(intersect) / sum(label_area)``.

Everything is derived from one ``(K, K)`` confusion matrix ``confusion[label, prediction]``, so
memory stays ``O(K²)`` whatever the number of images. Values are fractions in ``[0, 1]``
(mmsegmentation prints percentages; :func:`format_markdown_table` does too).

Two ways in:

* :class:`StreamingIoU` – ``update(predictions, labels)`` then ``compute()``.
* Trainer: ``TrainingArguments(batch_eval_metrics=True)`` with
  ``compute_metrics=SegmentationMetricsForTrainer(num_labels)`` and
  ``preprocess_logits_for_metrics=preprocess_logits_for_metrics`` (argmax at label size, per sample).

These are the definitions of ``evaluate``'s ``mean_iou`` too (dataset-level totals, ``nanmean``): a script written
for it, such as transformers' ``run_semantic_segmentation.py``, keeps ``evaluate.load("mean_iou")``; this package
has no ``evaluate`` module of its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from offseg_hf.data.files import IGNORE_INDEX

# Value the Trainer (and our collators) pad label maps with; never a real label.
LABEL_PAD_VALUE = -100

__all__ = [
    "LABEL_PAD_VALUE",
    "SegmentationMetricsForTrainer",
    "StreamingIoU",
    "confusion_matrix",
    "format_markdown_table",
    "metrics_from_confusion",
    "preprocess_logits_for_metrics",
]


def _as_numpy(array: Any) -> np.ndarray:
    """A numpy view of a numpy array, torch tensor (any device) or nested sequence."""
    if hasattr(array, "detach"):  # torch.Tensor without importing torch
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def confusion_matrix(
    predictions: Any, labels: Any, num_labels: int, ignore_index: int = IGNORE_INDEX, pad_value: int = LABEL_PAD_VALUE
) -> np.ndarray:
    """Counts of (label, prediction) pairs over the valid pixels.

    Args:
        predictions: integer class map(s), any shape ``(...)``, values in ``[0, num_labels)``
            (values outside are allowed only where the label is ignored).
        labels: integer label map(s) of the same shape; ``ignore_index`` and ``pad_value`` pixels are skipped.
        num_labels: ``K``.

    Returns:
        ``int64`` array ``(K, K)``: ``[label, prediction]`` counts.

    Raises:
        ValueError: different shapes, or a label / prediction value outside ``[0, K)`` on a counted pixel
            (the message names the value).
    """
    predictions = _as_numpy(predictions)
    labels = _as_numpy(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} must have the same shape")
    labels = labels.astype(np.int64, copy=False).ravel()
    predictions = predictions.astype(np.int64, copy=False).ravel()
    keep = (labels != ignore_index) & (labels != pad_value)
    labels, predictions = labels[keep], predictions[keep]
    for name, values in (("label", labels), ("prediction", predictions)):
        bad = (values < 0) | (values >= num_labels)
        if bad.any():
            raise ValueError(
                f"{name} value {int(values[bad][0])} is outside [0, {num_labels}) and is not the ignore index "
                f"{ignore_index}; check the dataset's label mapping (reduce_labels?) and num_labels"
            )
    counts = np.bincount(labels * num_labels + predictions, minlength=num_labels * num_labels)
    return counts.reshape(num_labels, num_labels)


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise ratio with NaN where the denominator is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)


def metrics_from_confusion(confusion: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """mIoU / mAcc / aAcc and per-class values of a ``(K, K)`` confusion matrix ``[label, prediction]``.

    Returns:
        ``{"mIoU", "mAcc", "aAcc"}`` floats (NaN if nothing was counted), ``"per_class_iou"`` and
        ``"per_class_accuracy"`` lists of ``K`` floats (NaN for the classes the rules above exclude),
        ``"num_pixels"`` (valid pixels counted) and ``"class_names"`` when given.
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    intersect = np.diag(confusion)
    label_area = confusion.sum(axis=1)
    pred_area = confusion.sum(axis=0)
    union = label_area + pred_area - intersect
    iou = _divide(intersect, union)
    acc = _divide(intersect, label_area)
    total = label_area.sum()

    def nanmean(values: np.ndarray) -> float:
        return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan

    result = {
        "mIoU": nanmean(iou),
        "mAcc": nanmean(acc),
        "aAcc": float(intersect.sum() / total) if total > 0 else math.nan,
        "per_class_iou": [float(v) for v in iou],
        "per_class_accuracy": [float(v) for v in acc],
        "num_pixels": int(total),
    }
    if class_names is not None:
        if len(class_names) != len(iou):
            raise ValueError(f"{len(class_names)} class names for a {len(iou)}-class confusion matrix")
        result["class_names"] = list(class_names)
    return result


class StreamingIoU:
    """Dataset-level IoU accumulated batch by batch in a ``(K, K)`` confusion matrix.

    Example::

        metric = StreamingIoU(num_labels=150)
        for predictions, labels in batches:      # (B, H, W) each, or (H, W)
            metric.update(predictions, labels)
        metric.compute()["mIoU"]
    """

    def __init__(self, num_labels: int, ignore_index: int = IGNORE_INDEX, class_names: Sequence[str] | None = None):
        self.num_labels = int(num_labels)
        self.ignore_index = int(ignore_index)
        self.class_names = list(class_names) if class_names is not None else None
        self.confusion = np.zeros((self.num_labels, self.num_labels), dtype=np.int64)

    def reset(self) -> None:
        """Forget everything counted so far."""
        self.confusion[:] = 0

    def update(self, predictions: Any, labels: Any) -> None:
        """Add a batch: ``predictions`` and ``labels`` of equal shape (see :func:`confusion_matrix`)."""
        self.confusion += confusion_matrix(predictions, labels, self.num_labels, self.ignore_index)

    def merge(self, other: "StreamingIoU | np.ndarray") -> None:
        """Add the counts of another accumulator (or a raw confusion matrix), e.g. from another process."""
        counts = other.confusion if isinstance(other, StreamingIoU) else np.asarray(other)
        self.confusion += counts.astype(np.int64)

    def compute(self) -> dict[str, Any]:
        """The metrics of everything counted so far (see :func:`metrics_from_confusion`)."""
        return metrics_from_confusion(self.confusion, self.class_names)


def _valid_extent(label) -> tuple[int, int]:
    """Height and width of the top-left block of a ``(H, W)`` label map not padded with ``LABEL_PAD_VALUE``.

    Collators and the Trainer pad label maps only at the bottom and the right, so the first column
    says how many rows are real and the first row how many columns are.
    """
    height = int((label[:, 0] != LABEL_PAD_VALUE).sum())
    width = int((label[0, :] != LABEL_PAD_VALUE).sum())
    return height, width


def preprocess_logits_for_metrics(logits, labels):
    """Turn logits into class maps at label resolution, for ``Trainer(preprocess_logits_for_metrics=...)``.

    Runs inside the Trainer's evaluation loop on every batch, so no logits are ever stored.

    Args:
        logits: ``(B, K, h, w)`` tensor (the model's low-resolution output), or a tuple whose first
            element is that tensor.
        labels: ``(B, H, W)`` tensor, padded with ``LABEL_PAD_VALUE`` (-100) at the bottom/right when
            the label maps of a batch (or of the processes) differ in size.

    Returns:
        ``(B, H, W)`` ``int32`` (gloo cannot gather int16) tensor: for sample ``i`` the argmax of its logits bilinearly resized
        (``align_corners=False``) to its own label size, ``LABEL_PAD_VALUE`` in the padding. Each sample
        is resized to its *own* label extent, so this is exact when the images of one batch share a
        size (always true with one image per device, the usual evaluation batch).
    """
    import torch
    import torch.nn.functional as F

    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    batch, _, height, width = labels.shape[0], None, labels.shape[-2], labels.shape[-1]
    out = torch.full((batch, height, width), LABEL_PAD_VALUE, dtype=torch.int32, device=logits.device)
    extents = [_valid_extent(labels[i]) for i in range(batch)]
    if len(set(extents)) == 1:
        h, w = extents[0]
        resized = F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)
        out[:, :h, :w] = resized.argmax(dim=1).to(torch.int32)
        return out
    for i, (h, w) in enumerate(extents):
        resized = F.interpolate(logits[i : i + 1].float(), size=(h, w), mode="bilinear", align_corners=False)
        out[i, :h, :w] = resized.argmax(dim=1)[0].to(torch.int32)
    return out


class SegmentationMetricsForTrainer:
    """``compute_metrics`` for ``TrainingArguments(batch_eval_metrics=True)``.

    The Trainer calls it once per evaluation batch with ``compute_result=False`` and with
    ``compute_result=True`` on the last batch; it accumulates a confusion matrix and, on the last
    call, returns ``{"mIoU", "mAcc", "aAcc", "IoU-<class>"...}`` and resets for the next evaluation.
    Predictions must already be class maps (use :func:`preprocess_logits_for_metrics`). Label maps
    may change size from batch to batch. Under several processes the Trainer gathers predictions
    and labels before calling, so every process holds the same totals.

    Args:
        num_labels: ``K``.
        ignore_index: label value left out (255).
        class_names: optional names for the per-class keys (``IoU-<name>``); indices otherwise.
        per_class: also return per-class IoU keys.
    """

    def __init__(
        self,
        num_labels: int,
        ignore_index: int = IGNORE_INDEX,
        class_names: Sequence[str] | None = None,
        per_class: bool = True,
    ):
        self.metric = StreamingIoU(num_labels, ignore_index, class_names)
        self.per_class = per_class

    def __call__(self, eval_prediction, compute_result: bool = False) -> dict[str, float] | None:
        predictions = eval_prediction.predictions
        if isinstance(predictions, (tuple, list)):
            predictions = predictions[0]
        labels = eval_prediction.label_ids
        if predictions.ndim == 4:
            raise ValueError(
                "compute_metrics received logits (B, K, h, w): pass "
                "preprocess_logits_for_metrics=offseg_hf.evaluation.metrics.preprocess_logits_for_metrics to the Trainer"
            )
        self.metric.update(predictions, labels)
        if not compute_result:
            return None
        result = self.metric.compute()
        self.metric.reset()
        metrics = {"mIoU": result["mIoU"], "mAcc": result["mAcc"], "aAcc": result["aAcc"]}
        if self.per_class:
            names = self.metric.class_names or [str(i) for i in range(self.metric.num_labels)]
            for name, value in zip(names, result["per_class_iou"]):
                metrics[f"IoU-{name}"] = value
        return metrics


def format_markdown_table(result: dict[str, Any], title: str | None = None) -> str:
    """A Markdown report of :func:`metrics_from_confusion` output, in percent with 2 decimals.

    One summary table (aAcc / mIoU / mAcc) and one per-class table (IoU / Acc; ``nan`` for
    excluded classes).
    """

    def pct(value: float) -> str:
        return "nan" if value is None or math.isnan(value) else f"{100 * value:.2f}"

    lines = [f"## {title}", ""] if title else []
    lines += ["| aAcc | mIoU | mAcc |", "|---:|---:|---:|"]
    lines += [f"| {pct(result['aAcc'])} | {pct(result['mIoU'])} | {pct(result['mAcc'])} |", ""]
    names = result.get("class_names") or [str(i) for i in range(len(result["per_class_iou"]))]
    lines += ["| class | IoU | Acc |", "|---|---:|---:|"]
    for name, iou, acc in zip(names, result["per_class_iou"], result["per_class_accuracy"]):
        lines.append(f"| {name} | {pct(iou)} | {pct(acc)} |")
    return "\n".join(lines) + "\n"
