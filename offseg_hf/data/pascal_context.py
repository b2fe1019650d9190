"""Pascal Context (59 classes) from the layout of mmsegmentation's ``pascal_context.py`` converter.

::

    data_dir/VOCdevkit/VOC2010/   (or data_dir itself being VOC2010/)
      JPEGImages/<id>.jpg
      SegmentationClassContext/<id>.png          0 = background (ignored), 1..59 = classes
      ImageSets/SegmentationContext/{train,val}.txt

The 59-class maps hold 0..59 with 0 = "background": labels are reduced (0 → 255, ``v`` → ``v - 1``).
"""

from __future__ import annotations

from pathlib import Path

from offseg_hf.data.files import canonical_split, first_existing, paired_file_dataset
from offseg_hf.data.registry import get_dataset

__all__ = ["load_pascal_context"]

_SPLIT_FILES = {"train": "train.txt", "validation": "val.txt"}


def load_pascal_context(data_dir: str | Path, split: str = "train"):
    """The ``train`` or ``validation`` (val) split listed in ``ImageSets/SegmentationContext``.

    Raises:
        FileNotFoundError: missing split list (a listed image or annotation that is missing fails when read, by name).
    """
    split = canonical_split(split)
    if split not in _SPLIT_FILES:
        raise ValueError(f"Pascal Context has train and validation splits, not {split!r}")
    root = Path(data_dir)
    root = first_existing([root / "VOCdevkit" / "VOC2010", root / "VOC2010", root], "VOC2010 folder")
    listing = root / "ImageSets" / "SegmentationContext" / _SPLIT_FILES[split]
    if not listing.is_file():
        raise FileNotFoundError(f"Pascal Context split list {listing} not found")
    ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    images = [root / "JPEGImages" / f"{name}.jpg" for name in ids]
    labels = [root / "SegmentationClassContext" / f"{name}.png" for name in ids]
    # missing images / annotations are reported by name when read and by the dataset check
    return paired_file_dataset(images, labels, get_dataset("pascal-context").label_mapping(), split)
