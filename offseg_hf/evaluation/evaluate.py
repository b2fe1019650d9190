"""Offline evaluation of a segmentation model on a dataset split: mIoU / mAcc / aAcc, per class.

The prediction for each image follows the paper's test protocol through
:func:`offseg_hf.inference.segment.segment_image` (``whole`` or ``slide``, optionally multi-scale + flip),
at the original label size, and is counted into a streaming confusion matrix
(:class:`offseg_hf.evaluation.metrics.StreamingIoU`): memory is ``O(K²)`` plus one image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["evaluate_model", "protocol_for", "write_report"]


def protocol_for(dataset: str, image_size: int | None = None):
    """The test protocol of a benchmark; for ``synthetic``, whole images of ``image_size`` (no resize)."""
    from offseg_hf.inference.segment import SegmentationProtocol, get_protocol

    if dataset == "synthetic":
        size = int(image_size or 128)
        return SegmentationProtocol(scale=(size, size), crop_size=(size, size), stride=(max(1, 2 * size // 3),) * 2)
    return get_protocol(dataset)


def evaluate_model(
    model,
    processor,
    dataset,
    num_labels: int,
    class_names: list[str] | None = None,
    mode: str = "whole",
    tta: bool = False,
    protocol: Any = "ade20k",
    max_samples: int | None = None,
    progress: bool = True,
    ignore_index: int | None = None,
) -> dict[str, Any]:
    """Segment every image of ``dataset`` (canonical rows) and score it against its label map.

    Args:
        model: an ``OffSegForSemanticSegmentation`` (or any model returning ``logits (B, K, h, w)``), in eval mode.
        processor: its image processor (normalisation).
        dataset: rows ``{"image": PIL, "label": PIL/array of train ids}`` (map-style or iterable).
        mode / tta / protocol: see :func:`offseg_hf.inference.segment.segment_image`.
        max_samples: stop after this many images.
        ignore_index: the label value left out, as the dataset's label maps encode it (default: the label
            tables' ``IGNORE_INDEX``, 255).

    Returns:
        :func:`offseg_hf.evaluation.metrics.metrics_from_confusion` output plus ``num_images``.

    Raises:
        ValueError: a prediction and its label map differ in size (the row index is named).
    """
    import torch
    from tqdm.auto import tqdm

    from offseg_hf.inference.segment import segment_image
    from offseg_hf.evaluation.metrics import StreamingIoU

    from offseg_hf.data.files import IGNORE_INDEX

    metric = StreamingIoU(num_labels, IGNORE_INDEX if ignore_index is None else ignore_index, class_names=class_names)
    total = max_samples
    if total is None and hasattr(dataset, "__len__"):
        total = len(dataset)
    count = 0
    with torch.inference_mode():
        for row in tqdm(dataset, total=total, desc=f"evaluate ({mode}{' + tta' if tta else ''})",
                        unit="image", disable=not progress):
            if max_samples is not None and count >= max_samples:
                break
            label = np.asarray(row["label"])
            result = segment_image(model, processor, row["image"], mode=mode, tta=tta, protocol=protocol)
            prediction = result.label_map.cpu().numpy()
            if prediction.shape != label.shape:
                raise ValueError(f"row {row.get('index', count)}: prediction {prediction.shape} vs label {label.shape}")
            metric.update(prediction, label)
            count += 1
    result = metric.compute()
    result["num_images"] = count
    return result


def write_report(result: dict[str, Any], output_dir: str | Path, name: str, settings: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``<name>.json`` (settings + metrics) and ``<name>.md`` (tables in percent) to ``output_dir``."""
    from offseg_hf.training.checkpoints import atomic_write_text
    from offseg_hf.evaluation.metrics import format_markdown_table

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / f"{name}.json"
    md_path = output_dir / f"{name}.md"
    atomic_write_text(json_path, json.dumps({"settings": settings, "metrics": result}, indent=2))
    header = ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None)
    atomic_write_text(md_path, format_markdown_table(result, title=f"{name}") + f"\n{result['num_images']} images; {header}\n")
    return json_path, md_path
