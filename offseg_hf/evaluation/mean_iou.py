"""``offseg_mean_iou``: mmsegmentation-style mIoU as an ``evaluate`` module that works offline.

Load it from its file path (no Hub access)::

    import evaluate, offseg_hf.evaluation.mean_iou
    metric = evaluate.load(offseg_hf.evaluation.mean_iou.__file__)
    for predictions, references in batches:      # (B, H, W) class maps each
        metric.add_batch(predictions=predictions, references=references)
    metric.compute(num_labels=150, ignore_index=255)

Unlike ``evaluate``'s default behaviour, ``add_batch`` does not store the maps in an Arrow table:
each batch goes straight into a ``(K, K)`` confusion matrix (see :mod:`offseg_hf.evaluation.metrics`), so
memory stays bounded. ``num_labels`` (and optionally ``ignore_index``, ``class_names``) may be given
to ``evaluate.load(..., num_labels=K)`` as config or to ``compute``. Single process only; under
several processes use the Trainer path of :mod:`offseg_hf.evaluation.metrics`, which gathers first.
"""

import datasets
import evaluate
import numpy as np

from offseg_hf.evaluation.metrics import confusion_matrix, metrics_from_confusion

_DESCRIPTION = "Dataset-level mIoU / mAcc / aAcc with mmsegmentation IoUMetric semantics (NaN classes excluded)."
_KWARGS_DESCRIPTION = """
Args:
    predictions: class maps, (H, W) each (or batches of them).
    references: label maps of the same shapes; ignore_index pixels are skipped.
    num_labels (int): number of classes K.
    ignore_index (int): label value to skip, default 255.
    class_names (list[str], optional): names reported with the per-class values.
Returns:
    mIoU, mAcc, aAcc, per_class_iou, per_class_accuracy, num_pixels (fractions in [0, 1]).
"""


class OffSegMeanIoU(evaluate.Metric):
    """Streaming mean IoU (confusion matrix kept in memory, nothing written to disk)."""

    def __init__(self, num_labels=None, ignore_index=255, class_names=None, **kwargs):
        super().__init__(**kwargs)
        self._num_labels = num_labels
        self._ignore_index = ignore_index
        self._class_names = class_names
        self._confusion = None
        self._pending = []  # batches seen before num_labels is known

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Array2D(shape=(None, None), dtype="int64"),
                    "references": datasets.Array2D(shape=(None, None), dtype="int64"),
                }
            ),
        )

    def _accumulate(self, predictions, references):
        if self._num_labels is None:
            self._pending.append((np.asarray(predictions), np.asarray(references)))
            return
        if self._confusion is None:
            self._confusion = np.zeros((self._num_labels, self._num_labels), dtype=np.int64)
        for prediction, reference in zip(_as_maps(predictions), _as_maps(references)):
            self._confusion += confusion_matrix(prediction, reference, self._num_labels, self._ignore_index)

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Count a batch of class maps (a list of ``(H, W)`` maps or a ``(B, H, W)`` array)."""
        self._accumulate(predictions, references)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Count one ``(H, W)`` class map."""
        self._accumulate([prediction], [reference])

    def compute(self, *, predictions=None, references=None, num_labels=None, ignore_index=None, class_names=None):
        """The metrics of everything added (plus ``predictions``/``references`` if given), then reset."""
        if num_labels is not None:
            self._num_labels = int(num_labels)
        if ignore_index is not None:
            self._ignore_index = int(ignore_index)
        if self._num_labels is None:
            raise ValueError("offseg_mean_iou needs num_labels (to evaluate.load(...) or to compute(...))")
        pending, self._pending = self._pending, []
        for batch in pending:
            self._accumulate(*batch)
        if predictions is not None:
            self._accumulate(predictions, references)
        confusion = self._confusion
        if confusion is None:
            confusion = np.zeros((self._num_labels, self._num_labels), dtype=np.int64)
        self._confusion = None
        return metrics_from_confusion(confusion, class_names or self._class_names)

    def _compute(self, predictions=None, references=None, **kwargs):  # pragma: no cover - compute is overridden
        raise NotImplementedError


def _as_maps(batch):
    """Iterate ``(H, W)`` maps from a list of maps or one ``(B, H, W)`` / ``(H, W)`` array."""
    if hasattr(batch, "ndim") and batch.ndim == 2:
        return [batch]
    if hasattr(batch, "detach"):
        batch = batch.detach().cpu().numpy()
    return list(batch)
