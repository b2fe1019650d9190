"""Metric tests: hand-computed confusion matrices, NaN rules, the Trainer path and the evaluate module."""

import math

import numpy as np
import pytest
import torch

from offseg_hf.evaluation.metrics import (
    LABEL_PAD_VALUE,
    SegmentationMetricsForTrainer,
    StreamingIoU,
    confusion_matrix,
    format_markdown_table,
    metrics_from_confusion,
    preprocess_logits_for_metrics,
)


def test_confusion_matrix_by_hand():
    labels = np.array([[0, 0, 1], [1, 2, 255]])
    preds = np.array([[0, 1, 1], [1, 0, 2]])
    # pairs (label, pred): (0,0) (0,1) (1,1) (1,1) (2,0); the 255 pixel is skipped
    expected = np.array([[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    np.testing.assert_array_equal(confusion_matrix(preds, labels, 3), expected)


def test_metrics_by_hand_and_nan_rules():
    # 4 classes. class 2: predicted but never in the labels -> IoU 0, Acc NaN.
    # class 3: in neither -> IoU NaN and Acc NaN, left out of both means.
    labels = np.array([0, 0, 0, 1, 1, 255])
    preds = np.array([0, 0, 2, 1, 0, 3])
    result = StreamingIoU(4)
    result.update(preds, labels)
    out = result.compute()
    # class 0: intersect 2, label 3, pred 3 -> union 4 -> IoU .5, Acc 2/3
    # class 1: intersect 1, label 2, pred 1 -> union 2 -> IoU .5, Acc .5
    # class 2: intersect 0, label 0, pred 1 -> IoU 0, Acc NaN
    assert out["per_class_iou"][:3] == pytest.approx([0.5, 0.5, 0.0])
    assert math.isnan(out["per_class_iou"][3])
    assert out["per_class_accuracy"][:2] == pytest.approx([2 / 3, 0.5])
    assert math.isnan(out["per_class_accuracy"][2]) and math.isnan(out["per_class_accuracy"][3])
    assert out["mIoU"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert out["mAcc"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert out["aAcc"] == pytest.approx(3 / 5)
    assert out["num_pixels"] == 5


def test_dataset_level_not_image_average():
    metric = StreamingIoU(2)
    metric.update(np.array([0, 0, 0, 0]), np.array([0, 0, 0, 1]))  # image 1
    metric.update(np.array([1]), np.array([1]))  # image 2
    out = metric.compute()
    # totals: class 0 inter 3 union 4; class 1 inter 1 union 2
    assert out["mIoU"] == pytest.approx((3 / 4 + 1 / 2) / 2)


def test_all_ignored_gives_nan_and_bad_label_names_value():
    out = StreamingIoU(3).compute()
    assert math.isnan(out["mIoU"]) and math.isnan(out["aAcc"])
    with pytest.raises(ValueError, match="label value 7"):
        confusion_matrix(np.zeros(3), np.array([0, 7, 255]), 3)


def test_trainer_path_with_varying_label_sizes():
    """Batches of different label sizes, padded with -100 inside a batch: same result as per-image counting."""
    torch.manual_seed(0)
    num_labels = 5
    compute = SegmentationMetricsForTrainer(num_labels, class_names=[f"c{i}" for i in range(num_labels)])
    reference = StreamingIoU(num_labels)
    batches = [(2, 16, 20), (1, 9, 13), (3, 32, 8)]

    class Prediction:  # the shape of transformers.EvalPrediction
        def __init__(self, predictions, label_ids):
            self.predictions, self.label_ids = predictions, label_ids

    result = None
    for index, (batch, height, width) in enumerate(batches):
        logits = torch.randn(batch, num_labels, math.ceil(height / 4), math.ceil(width / 4))
        labels = torch.randint(0, num_labels, (batch, height, width))
        labels[:, 0, 0] = 255
        # simulate the Trainer padding the second sample's label map across processes
        padded = torch.full((batch, height + 3, width + 2), LABEL_PAD_VALUE)
        padded[:, :height, :width] = labels
        predictions = preprocess_logits_for_metrics(logits, padded)
        assert predictions.shape == padded.shape and predictions.dtype == torch.int32
        assert (predictions[:, height:, :] == LABEL_PAD_VALUE).all()
        full = torch.nn.functional.interpolate(logits, size=(height, width), mode="bilinear").argmax(1)
        reference.update(full, labels)
        result = compute(Prediction(predictions, padded), compute_result=index == len(batches) - 1)
        if index < len(batches) - 1:
            assert result is None
    expected = reference.compute()
    assert result["mIoU"] == pytest.approx(expected["mIoU"])
    assert result["aAcc"] == pytest.approx(expected["aAcc"])
    assert result["IoU-c0"] == pytest.approx(expected["per_class_iou"][0])
    # reset after compute_result=True
    assert compute.metric.confusion.sum() == 0


def test_preprocess_mixed_extents_in_one_batch():
    logits = torch.zeros(2, 3, 2, 2)
    logits[0, 1] = 1.0
    logits[1, 2] = 1.0
    labels = torch.full((2, 8, 8), LABEL_PAD_VALUE)
    labels[0, :8, :6] = 0
    labels[1, :5, :8] = 0
    out = preprocess_logits_for_metrics(logits, labels)
    assert (out[0, :, :6] == 1).all() and (out[0, :, 6:] == LABEL_PAD_VALUE).all()
    assert (out[1, :5] == 2).all() and (out[1, 5:] == LABEL_PAD_VALUE).all()


def test_markdown_table():
    out = metrics_from_confusion(np.array([[3, 1], [0, 0]]), class_names=["a", "b"])
    table = format_markdown_table(out, title="val")
    assert "| a | 75.00 | 75.00 |" in table and "| b | 0.00 | nan |" in table
