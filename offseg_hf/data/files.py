"""Shared machinery of the dataset loaders: label mappings, file-pair datasets, split names, file look-ups.

Every loader returns a ``datasets`` dataset whose rows are in one canonical form::

    {"image": PIL.Image (RGB), "label": PIL.Image ("L", train ids 0..K-1, 255 = ignore), "index": int}

* local folders (official layouts) → map-style ``datasets.Dataset`` holding only the file paths;
  files are opened and labels converted lazily on access (``with_transform``), nothing is copied;
* Hub ids → ``datasets.IterableDataset`` with ``streaming=True``, converted by ``.map``.

:func:`offseg_hf.data.loading.load_segmentation_dataset` picks the right loader from a dataset name; the
loaders import this module, never the dispatcher.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from offseg_hf.data.tables import CITYSCAPES_LABEL_ID_TO_TRAIN_ID, COCO_STUFF_ID_TO_TRAIN_ID, lookup_table

__all__ = [
    "LabelMapping",
    "canonical_split",
    "LABEL_FORMATS",
    "first_existing",
    "label_mapping_for",
    "paired_file_dataset",
    "read_label_map",
    "sorted_files",
]

IGNORE_INDEX = 255


@dataclass(frozen=True)
class LabelMapping:
    """Raw annotation values → train ids through a 256-entry lookup table.

    Attributes:
        lut: ``uint8 (256,)``: ``train_id = lut[raw]``.
        valid: ``bool (256,)``: raw values allowed to appear; any other raises (the value is named).
        description: human-readable rule, used in error messages.
    """

    lut: np.ndarray
    valid: np.ndarray
    description: str

    @classmethod
    def identity(cls, num_labels: int) -> "LabelMapping":
        """Raw values already are train ids ``0..K-1``; 255 is ignore."""
        lut = np.arange(256, dtype=np.uint8)
        valid = np.zeros(256, dtype=bool)
        valid[:num_labels] = True
        valid[IGNORE_INDEX] = True
        return cls(lut, valid, f"train ids 0..{num_labels - 1} (255 = ignore)")

    @classmethod
    def reduce_labels(cls, num_labels: int) -> "LabelMapping":
        """Raw 0 = "other" → 255, raw ``v`` in ``1..K`` → ``v - 1`` (ADE20K, Pascal Context 59)."""
        lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
        lut[1 : num_labels + 1] = np.arange(num_labels, dtype=np.uint8)
        valid = np.zeros(256, dtype=bool)
        valid[: num_labels + 1] = True
        valid[IGNORE_INDEX] = True
        return cls(lut, valid, f"raw 0..{num_labels} with 0 = ignore (reduce labels)")

    @classmethod
    def from_table(cls, table: dict[int, int], description: str) -> "LabelMapping":
        """A raw-id table (e.g. COCO-Stuff ids, Cityscapes labelIds); ids without an entry become 255."""
        lut = lookup_table(table)
        valid = np.ones(256, dtype=bool)
        return cls(lut, valid, description)

    def __call__(self, raw: np.ndarray, source: str = "label map") -> np.ndarray:
        """``uint8 (H, W)`` train ids of a raw ``(H, W)`` label map.

        Raises:
            ValueError: a raw value the mapping does not allow; the message names it and ``source``.
        """
        raw = np.asarray(raw)
        if raw.ndim != 2:
            raise ValueError(f"{source}: expected a single-channel label map (H, W), got shape {raw.shape}")
        if raw.dtype != np.uint8:
            if raw.size and (raw.min() < 0 or raw.max() > 255):
                bad = int(raw.max() if raw.max() > 255 else raw.min())
                raise ValueError(f"{source}: label value {bad} does not fit the expected {self.description}")
            raw = raw.astype(np.uint8)
        counts = np.bincount(raw.ravel(), minlength=256)
        present = np.flatnonzero(counts)
        invalid = present[~self.valid[present]]
        if invalid.size:
            values = ", ".join(f"{int(v)} ({int(counts[v])} pixels)" for v in invalid[:10])
            more = f" and {invalid.size - 10} more" if invalid.size > 10 else ""
            raise ValueError(
                f"{source}: label value{'s' if invalid.size > 1 else ''} {values}{more} not valid for {self.description}"
            )
        return self.lut[raw]


LABEL_FORMATS = ("train-ids", "reduce", "coco-stuff-raw", "cityscapes-label-ids")
"""How annotation files store classes: train ids already; ``reduce`` (0 = no class, ``v`` → ``v - 1``, ADE20K and
Pascal Context); COCO-Stuff-164k's raw ids 0..181; Cityscapes' ``labelIds`` 0..33."""


def label_mapping_for(label_format: str, num_labels: int) -> LabelMapping:
    """The :class:`LabelMapping` of a ``label_format`` (one of :data:`LABEL_FORMATS`)."""
    if label_format == "train-ids":
        return LabelMapping.identity(num_labels)
    if label_format == "reduce":
        return LabelMapping.reduce_labels(num_labels)
    if label_format == "coco-stuff-raw":
        return LabelMapping.from_table(COCO_STUFF_ID_TO_TRAIN_ID, "COCO-Stuff-164k raw ids 0..181")
    if label_format == "cityscapes-label-ids":
        return LabelMapping.from_table(CITYSCAPES_LABEL_ID_TO_TRAIN_ID, "Cityscapes labelIds 0..33")
    raise ValueError(f"unknown label_format {label_format!r}; choose one of {', '.join(LABEL_FORMATS)}")


def read_label_map(path: str | Path) -> np.ndarray:
    """A label PNG as an integer array ``(H, W)`` (palette images give their indices)."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"{path}: label maps must be single-channel PNGs, got mode {image.mode!r}")
        return np.asarray(image)


def paired_file_dataset(
    image_paths: Sequence[str | Path],
    label_paths: Sequence[str | Path],
    mapping: LabelMapping,
    split: str | None = None,
):
    """A lazy map-style ``datasets.Dataset`` over (image file, label file) pairs.

    Only the paths are stored; rows are read on access and returned in the canonical form
    (``image`` RGB PIL, ``label`` "L" PIL of train ids, ``index``).

    Raises:
        ValueError: no pairs, or lists of different lengths.
    """
    import datasets
    from PIL import Image

    if len(image_paths) != len(label_paths):
        raise ValueError(f"{len(image_paths)} images but {len(label_paths)} label maps")
    if not image_paths:
        raise ValueError("no (image, label) pairs found")

    def read(batch: dict) -> dict:
        images, labels = [], []
        for image_path, label_path in zip(batch["image_path"], batch["label_path"]):
            if not Path(image_path).is_file():
                raise FileNotFoundError(f"{image_path}: image not found (listed, or paired with {label_path})")
            if not Path(label_path).is_file():
                raise FileNotFoundError(f"{image_path} has no annotation {label_path}")
            with Image.open(image_path) as image:
                images.append(image.convert("RGB"))
            train_ids = mapping(read_label_map(label_path), source=label_path)
            if train_ids.shape != (images[-1].height, images[-1].width):
                raise ValueError(
                    f"{label_path}: label map {train_ids.shape} and image {image_path} "
                    f"({images[-1].height}, {images[-1].width}) differ in size"
                )
            labels.append(Image.fromarray(train_ids, mode="L"))
        return {"image": images, "label": labels, "index": list(batch["index"])}

    table = datasets.Dataset.from_dict(
        {
            "image_path": [str(p) for p in image_paths],
            "label_path": [str(p) for p in label_paths],
            "index": list(range(len(image_paths))),
        },
        split=split,
    )
    return table.with_transform(read)


_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "validation", "validation": "validation", "test": "test"}


def canonical_split(split: str) -> str:
    """``"train"``, ``"validation"`` or ``"test"`` from common spellings (``val``, ``training`` …)."""
    key = split.lower()
    if key not in _SPLIT_ALIASES:
        raise ValueError(f"unknown split {split!r}; use train, validation or test")
    return _SPLIT_ALIASES[key]


def sorted_files(folder: Path, pattern: str) -> list[Path]:
    """Files under ``folder`` matching ``pattern`` (recursive glob), sorted, or a clear error."""
    if not folder.is_dir():
        raise FileNotFoundError(f"expected a folder at {folder}")
    files = sorted(folder.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no files matching {pattern!r} under {folder}")
    return files


def first_existing(candidates: Sequence[Path], what: str) -> Path:
    """The first existing path among ``candidates``, or an error listing them all."""
    for candidate in candidates:
        if candidate.exists():
            return candidate
    listed = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"could not find the {what}; looked for: {listed}")
