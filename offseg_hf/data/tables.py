"""Label tables of the four OffSeg benchmarks: class names, palettes and raw-id remappings (data of the
registry, :mod:`offseg_hf.data.registry`, which resolves names and aliases).

The tables live as JSON data next to this module (``offseg_hf/data/tables/*.json``) and were
generated from the dataset classes of mmsegmentation 1.2.2, the codebase the OffSeg paper trains
and evaluates with, so class index ``i`` here is output channel ``i`` of an official checkpoint:

=================  =======  =======================================  ==========================
name               classes  source                                   raw label handling
=================  =======  =======================================  ==========================
``ade20k``         150      ``ADE20KDataset``                        reduce labels (0 -> 255)
``coco-stuff``     171      ``COCOStuffDataset`` (COCO-Stuff-164k)   train ids 0..170, 255 void
``cityscapes``     19       ``CityscapesDataset``                    ``*_labelTrainIds.png``
``pascal-context`` 59       ``PascalContextDataset59``               reduce labels (0 -> 255)
=================  =======  =======================================  ==========================

The only deviation from mmsegmentation: surrounding whitespace is stripped from class names
(ADE20K index 7 is ``'bed '`` upstream, ``'bed'`` here).

Two raw-id tables convert released annotations into train ids:

* :data:`COCO_STUFF_ID_TO_TRAIN_ID`: the 182 ids of COCO-Stuff-164k ``stuffthingmaps`` (0..181;
  11 of them unused) to the 171 train ids, as mmsegmentation's ``coco_stuff164k.py`` converter
  does; ids without an entry (and 255) become 255.
* :data:`CITYSCAPES_LABEL_ID_TO_TRAIN_ID`: cityscapesscripts' ``labelId`` (0..33) to ``trainId``
  (0..18 or 255).

:func:`lookup_table` turns either mapping into a 256-entry ``uint8`` array, so a whole label map is
converted with one indexing operation: ``lookup_table(COCO_STUFF_ID_TO_TRAIN_ID)[raw]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = [
    "CITYSCAPES_LABEL_ID_TO_TRAIN_ID",
    "COCO_STUFF_ID_TO_TRAIN_ID",
    "DatasetInfo",
    "load_dataset_info",
    "lookup_table",
]

_TABLE_DIR = Path(__file__).with_name("tables")


@dataclass(frozen=True)
class DatasetInfo:
    """Class names, colours and label conventions of one benchmark.

    Attributes:
        name: canonical dataset name (:data:`offseg_hf.data.registry.DATASET_NAMES`).
        class_names: ``num_labels`` names; index ``i`` is logit channel ``i``.
        palette: one ``(R, G, B)`` colour (0..255) per class, mmsegmentation's visualisation colours.
        ignore_index: label value excluded from loss and metrics.
        reduce_labels: ``True`` when raw annotation value 0 means "no class" (ADE20K, Pascal
            Context 59): raw 0 becomes ``ignore_index`` and every other raw value ``v`` becomes ``v - 1``.
    """

    name: str
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int = 255
    reduce_labels: bool = False

    def __post_init__(self) -> None:
        if len(self.palette) != len(self.class_names):
            raise ValueError(
                f"dataset {self.name!r}: {len(self.class_names)} class names but {len(self.palette)} palette colours"
            )

    @property
    def num_labels(self) -> int:
        """Number of classes (logit channels)."""
        return len(self.class_names)

    @property
    def id2label(self) -> dict[int, str]:
        """``{class index: name}``, the form ``PretrainedConfig.id2label`` takes."""
        return dict(enumerate(self.class_names))

    @property
    def label2id(self) -> dict[str, int]:
        """``{name: class index}``."""
        return {name: index for index, name in enumerate(self.class_names)}


@cache
def _load(name: str) -> dict:
    path = _TABLE_DIR / f"{name}.json"
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@cache
def load_dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``tables/<name>.json`` (a canonical name; aliases and the list of benchmarks
    are the registry's: :func:`offseg_hf.data.registry.get_dataset_info`)."""
    data = _load(name)
    return DatasetInfo(
        name=name,
        class_names=tuple(data["class_names"]),
        palette=tuple(tuple(int(v) for v in colour) for colour in data["palette"]),
        ignore_index=int(data["ignore_index"]),
        reduce_labels=bool(data["reduce_labels"]),
    )


def lookup_table(mapping: Mapping[int, int], fill: int = 255) -> "np.ndarray":
    """A ``uint8`` array ``lut`` of shape ``(256,)`` with ``lut[raw] = mapping.get(raw, fill)``.

    ``lut[raw_label_map]`` converts a whole ``uint8`` label map at once.
    """
    import numpy as np

    lut = np.full(256, fill, dtype=np.uint8)
    for raw, train in mapping.items():
        lut[raw] = train
    return lut


def _int_mapping(name: str, key: str) -> dict[int, int]:
    return {int(raw): int(train) for raw, train in _load(name)[key].items()}


COCO_STUFF_ID_TO_TRAIN_ID: dict[int, int] = _int_mapping("coco-stuff", "id_to_train_id")
"""COCO-Stuff-164k raw id (0..181) -> train id (0..170); absent ids map to 255."""

CITYSCAPES_LABEL_ID_TO_TRAIN_ID: dict[int, int] = _int_mapping("cityscapes", "label_id_to_train_id")
"""Cityscapes ``labelId`` (0..33) -> ``trainId`` (0..18, or 255 for classes not evaluated)."""
