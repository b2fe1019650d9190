"""COCO-Stuff-164k (171 classes) from the official layouts.

Two layouts are recognised under ``data_dir`` (``S`` is ``train2017`` or ``val2017``):

* mmsegmentation's: ``images/S/*.jpg`` and ``annotations/S/*.png``;
* the download as released: ``S/*.jpg`` (COCO images) and ``stuffthingmaps_trainval2017/S/*.png``.

For an image ``NAME.jpg`` the label is ``NAME_labelTrainIds.png`` when present (already converted
by mmsegmentation's ``coco_stuff164k.py``: train ids 0..170, 255 void) and otherwise the raw
``NAME.png`` stuffthingmap, whose ids 0..181 (255 unlabeled) are mapped to train ids here with
:data:`offseg_hf.data.tables.COCO_STUFF_ID_TO_TRAIN_ID`, exactly as that converter does (the 11
unused ids and 255 become 255).
"""

from __future__ import annotations

from pathlib import Path

from offseg_hf.data.files import LabelMapping, canonical_split, first_existing, paired_file_dataset, sorted_files
from offseg_hf.data.registry import get_dataset

__all__ = ["load_coco_stuff"]

_SPEC = get_dataset("coco-stuff")
_SPLIT_FOLDERS = {"train": "train2017", "validation": "val2017"}


def load_coco_stuff(data_dir: str | Path, split: str = "train"):
    """The ``train`` (train2017) or ``validation`` (val2017) split.

    Returns:
        canonical lazy ``datasets.Dataset``; converted (``_labelTrainIds``) and raw label files may
        not be mixed within one split.
    """
    split = canonical_split(split)
    if split not in _SPLIT_FOLDERS:
        raise ValueError(f"COCO-Stuff-164k has train and validation splits with annotations, not {split!r}")
    root = Path(data_dir)
    folder = _SPLIT_FOLDERS[split]
    image_dir = first_existing([root / "images" / folder, root / folder], f"COCO {folder} image folder")
    label_dir = first_existing(
        [root / "annotations" / folder, root / "stuffthingmaps_trainval2017" / folder, root / "stuffthingmaps" / folder],
        f"COCO-Stuff {folder} annotation folder",
    )
    images = sorted_files(image_dir, "*.jpg")
    converted = [label_dir / f"{image.stem}_labelTrainIds.png" for image in images]
    raw = [label_dir / f"{image.stem}.png" for image in images]
    if all(path.is_file() for path in converted):
        return paired_file_dataset(images, converted, LabelMapping.identity(_SPEC.num_labels), split)
    return paired_file_dataset(images, raw, _SPEC.label_mapping(), split)
