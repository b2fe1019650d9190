"""Cityscapes (19 evaluated classes) from the official ``leftImg8bit`` / ``gtFine`` layout.

::

    data_dir/leftImg8bit/{train,val,test}/<city>/<stem>_leftImg8bit.png
    data_dir/gtFine/{train,val,test}/<city>/<stem>_gtFine_labelIds.png
                                            <stem>_gtFine_labelTrainIds.png   (optional)

``*_labelTrainIds.png`` (written by cityscapesscripts' ``createTrainIdLabelImgs``) is used when
present; otherwise ``*_labelIds.png`` is mapped with
:data:`offseg_hf.data.tables.CITYSCAPES_LABEL_ID_TO_TRAIN_ID` (ids not evaluated → 255).
"""

from __future__ import annotations

from pathlib import Path

from offseg_hf.data.files import LabelMapping, canonical_split, paired_file_dataset, sorted_files
from offseg_hf.data.registry import get_dataset

__all__ = ["load_cityscapes"]

_SPEC = get_dataset("cityscapes")
_SPLIT_FOLDERS = {"train": "train", "validation": "val", "test": "test"}


def load_cityscapes(data_dir: str | Path, split: str = "train"):
    """The ``train``, ``validation`` (val) or ``test`` split (test labels are all "unlabeled" upstream).

    Returns:
        canonical lazy ``datasets.Dataset`` with 19 train ids.
    """
    split = canonical_split(split)
    root = Path(data_dir)
    folder = _SPLIT_FOLDERS[split]
    images = sorted_files(root / "leftImg8bit" / folder, "*/*_leftImg8bit.png")
    train_ids, label_ids = [], []
    for image in images:
        stem = image.name[: -len("_leftImg8bit.png")]
        base = root / "gtFine" / folder / image.parent.name / f"{stem}_gtFine"
        train_ids.append(Path(f"{base}_labelTrainIds.png"))
        label_ids.append(Path(f"{base}_labelIds.png"))
    if all(path.is_file() for path in train_ids):
        return paired_file_dataset(images, train_ids, LabelMapping.identity(_SPEC.num_labels), split)
    return paired_file_dataset(images, label_ids, _SPEC.label_mapping(), split)
