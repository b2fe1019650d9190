"""From canonical rows to model batches: per-example transforms and the collator.

Canonical rows (``{"image", "label", "index"}``, see :mod:`offseg_hf.data.loading`) become
``{"pixel_values": (3, H, W) float32, "labels": (H', W') int64}`` through :class:`ExampleTransform`,
attached lazily with :func:`attach_transform`; :func:`collate_segmentation` stacks them into
``pixel_values (B, 3, H, W)`` and ``labels (B, H', W')``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from offseg_hf.data.transforms import sample_seed, seeded, to_tv_tensors

__all__ = ["ExampleTransform", "SegmentationCollator", "attach_transform", "collate_segmentation", "semantic_to_mask_targets"]


class ExampleTransform:
    """Canonical rows → model inputs through a ``(Image, Mask) → (Image, Mask)`` transform.

    Args:
        transform: e.g. :func:`offseg_hf.data.transforms.build_train_transform`.
        seed: when not ``None``, sample ``index`` in epoch ``epoch`` is transformed under an RNG seeded
            from ``(seed, epoch, index)``: augmentations are reproducible and identical after a resume.
            Set :attr:`epoch` at the start of each epoch (the training callback does).
    """

    def __init__(self, transform: Callable, seed: int | None = None):
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def one(self, image: Any, label: Any, index: int | None = None) -> dict[str, torch.Tensor]:
        """``pixel_values (3, H, W) float32`` and ``labels (H', W') int64`` of one example."""
        image_t, mask_t = to_tv_tensors(image, label)
        if self.seed is not None and index is not None:
            image_t, mask_t = seeded(self.transform, sample_seed(self.seed, self.epoch, int(index)), image_t, mask_t)
        else:
            image_t, mask_t = self.transform(image_t, mask_t)
        out = {
            "pixel_values": image_t.as_subclass(torch.Tensor).float(),
            "labels": mask_t.as_subclass(torch.Tensor).long(),
        }
        if index is not None:
            out["index"] = int(index)
        return out

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        """Batched form, for ``datasets.Dataset.with_transform``."""
        indices = batch.get("index") or [None] * len(batch["image"])
        out = [self.one(image, label, index) for image, label, index in zip(batch["image"], batch["label"], indices)]
        result = {"pixel_values": [o["pixel_values"] for o in out], "labels": [o["labels"] for o in out]}
        if all("index" in o for o in out):
            result["index"] = [o["index"] for o in out]
        return result


def attach_transform(dataset, example_transform: ExampleTransform):
    """``dataset`` (canonical rows) with ``example_transform`` applied lazily on access.

    A map-style dataset keeps its own row transform (file reading, label mapping) and gets this one
    composed after it; an ``IterableDataset`` gets a ``.map``.
    """
    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        def one(row: dict) -> dict:
            return example_transform.one(row["image"], row["label"], row.get("index"))

        return dataset.map(one, remove_columns=["image", "label"])
    previous = (dataset.format.get("format_kwargs") or {}).get("transform")

    def composed(batch: dict) -> dict:
        return example_transform(previous(batch) if previous is not None else batch)

    return dataset.with_transform(composed)


def collate_segmentation(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack examples into ``pixel_values (B, 3, H, W)`` and ``labels (B, H', W')`` (``int64``).

    Training crops all share one size. At evaluation, labels keep their original size and images
    their test-resized size, so one batch may only hold examples of one size: use an evaluation
    batch of 1 per device for datasets whose images vary in size (ADE20K, COCO-Stuff, Pascal
    Context). Padding a batch would shift the resize geometry the metric relies on.

    Raises:
        ValueError: examples of different sizes (the sizes are named).
    """
    images = [example["pixel_values"] for example in examples]
    labels = [example["labels"] for example in examples]
    image_sizes = {tuple(t.shape[-2:]) for t in images}
    label_sizes = {tuple(t.shape[-2:]) for t in labels}
    if len(image_sizes) > 1 or len(label_sizes) > 1:
        raise ValueError(
            f"a batch mixes image sizes {sorted(image_sizes)} / label sizes {sorted(label_sizes)}: "
            "use --eval-batch-size 1 (per device) for datasets whose images vary in size"
        )
    return {"pixel_values": torch.stack(images), "labels": torch.stack(labels)}


class SegmentationCollator:
    """:func:`collate_segmentation` plus the label check of the model's side, on the CPU before the batch moves.

    The model's loss no longer checks label values (that would synchronise the device every step), so the
    collator does: every label must be a class ``0..num_labels-1`` or the ignore index. The dataset's ignore
    value (``dataset_ignore_index``, 255 in every label table) becomes the model's ``ignore_index``
    (``config.semantic_loss_ignore_index``) here when the two differ.

    Raises:
        ValueError: a label value outside the classes, naming the value, the sample (dataset row) and the
            rule; label files with values outside their dataset's encoding are caught earlier, by name, when read.
    """

    def __init__(self, num_labels: int, ignore_index: int, dataset_ignore_index: int | None = None):
        from offseg_hf.data.files import IGNORE_INDEX

        self.num_labels = int(num_labels)
        self.ignore_index = int(ignore_index)
        self.dataset_ignore_index = IGNORE_INDEX if dataset_ignore_index is None else int(dataset_ignore_index)

    def __call__(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = collate_segmentation(examples)
        labels = batch["labels"]
        if self.dataset_ignore_index != self.ignore_index:
            labels = labels.masked_fill(labels == self.dataset_ignore_index, self.ignore_index)
            batch["labels"] = labels
        values = torch.unique(labels)
        bad = values[((values < 0) | (values >= self.num_labels)) & (values != self.ignore_index)]
        if bad.numel():
            for example in examples:
                example_bad = [int(v) for v in bad if bool((example["labels"] == v).any())]
                if example_bad:
                    row = example.get("index", "?")
                    raise ValueError(
                        f"sample {row} (dataset row): label value{'s' if len(example_bad) > 1 else ''} "
                        f"{', '.join(map(str, example_bad))} outside the model's classes 0..{self.num_labels - 1} "
                        f"(ignore index {self.ignore_index}); does the dataset match the model's num_labels?"
                    )
        return batch


def semantic_to_mask_targets(
    labels: torch.Tensor, ignore_index: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Label maps → the targets of a mask-classification loss (Mask2Former), as the reference's
    ``_seg_data_to_instance_data``: per image one binary mask per class present and its class index.

    Args:
        labels: ``(B, H, W)`` int64 label maps; ``ignore_index`` pixels (and negative padding) belong to no mask.
        ignore_index: the ignored label value.

    Returns:
        ``(mask_labels, class_labels)``: per image a ``(N, H, W)`` float32 tensor of masks and the ``(N,)`` int64
        classes, in increasing class order; ``N = 0`` for an image with no labelled pixel.
    """
    mask_labels, class_labels = [], []
    for label in labels:
        classes = torch.unique(label)
        classes = classes[(classes != ignore_index) & (classes >= 0)]
        mask_labels.append((label[None] == classes[:, None, None]).float())
        class_labels.append(classes)
    return mask_labels, class_labels
