"""ADE20K (SceneParsing, 150 classes) from the official ``ADEChallengeData2016`` layout.

::

    ADEChallengeData2016/
      images/training/ADE_train_00000001.jpg ...      images/validation/ADE_val_00000001.jpg ...
      annotations/training/ADE_train_00000001.png ... annotations/validation/...

Annotations hold 0..150 with 0 = "other": labels are reduced (0 → 255, ``v`` → ``v - 1``) once,
here; nothing downstream reduces them again.
"""

from __future__ import annotations

from pathlib import Path

from offseg_hf.data.files import canonical_split, first_existing, paired_file_dataset, sorted_files
from offseg_hf.data.registry import get_dataset

__all__ = ["load_ade20k"]

_SPLIT_FOLDERS = {"train": "training", "validation": "validation"}


def load_ade20k(data_dir: str | Path, split: str = "train"):
    """The ``train`` or ``validation`` split; ``data_dir`` is ``ADEChallengeData2016`` or its parent.

    Returns:
        canonical lazy ``datasets.Dataset`` (see :mod:`offseg_hf.data.loading`), 150 train ids.

    Raises:
        FileNotFoundError: missing folder (an image without its annotation fails when read, by name).
    """
    split = canonical_split(split)
    if split not in _SPLIT_FOLDERS:
        raise ValueError(f"ADE20K has train and validation splits with annotations, not {split!r}")
    root = Path(data_dir)
    root = first_existing([root / "ADEChallengeData2016", root], "ADE20K root")
    folder = _SPLIT_FOLDERS[split]
    images = sorted_files(root / "images" / folder, "*.jpg")
    # an image without its annotation is reported by name when read, and by the dataset check (offseg check-data)
    labels = [root / "annotations" / folder / f"{image.stem}.png" for image in images]
    return paired_file_dataset(images, labels, get_dataset("ade20k").label_mapping(), split)
