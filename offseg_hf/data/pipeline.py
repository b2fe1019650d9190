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

__all__ = ["ExampleTransform", "attach_transform", "collate_segmentation"]


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
        return {
            "pixel_values": image_t.as_subclass(torch.Tensor).float(),
            "labels": mask_t.as_subclass(torch.Tensor).long(),
        }

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        """Batched form, for ``datasets.Dataset.with_transform``."""
        indices = batch.get("index") or [None] * len(batch["image"])
        out = [self.one(image, label, index) for image, label, index in zip(batch["image"], batch["label"], indices)]
        return {"pixel_values": [o["pixel_values"] for o in out], "labels": [o["labels"] for o in out]}


def attach_transform(dataset, example_transform: ExampleTransform):
    """``dataset`` (canonical rows) with ``example_transform`` applied lazily on access.

    A map-style dataset keeps its own row transform (file reading, label mapping) and gets this one
    composed after it; an ``IterableDataset`` gets a ``.map``.
    """
    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        def one(row: dict) -> dict:
            return example_transform.one(row["image"], row["label"], row.get("index"))

        return dataset.map(one, remove_columns=["image", "label", "index"])
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
