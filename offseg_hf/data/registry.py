"""One spec per dataset: everything the package knows about a benchmark, in one place.

A :class:`DatasetSpec` holds a dataset's names (canonical + aliases), its label table (class names, palette,
ignore index, from ``tables/<name>.json`` via :mod:`offseg_hf.data.tables`), how its released annotations map to
train ids (``label_format``), the paper's test protocol, the training recipe, the Hub datasets it streams from, the
loader of its official local layout, and the text its model cards use. :data:`DATASETS` lists them; every other
module asks here (:func:`get_dataset`, :func:`get_dataset_info`, :func:`identify_dataset`) instead of keeping its
own table.

=================  =======  ==========================  ======================  ===================================
name               classes  test protocol (resize)      recipe (steps, batch)   label format
=================  =======  ==========================  ======================  ===================================
``ade20k``         150      2048×512, slide 512 / 480   160k, 16, crop 512      ``reduce``
``coco-stuff``     171      2048×512, slide 512 / 480   80k, 16, crop 512       ``coco-stuff-raw``
``cityscapes``     19       2048×1024, slide 1024 / 768 160k, 8, crop 1024      ``cityscapes-label-ids``
``pascal-context`` 59       520×520, slide 480 / 320    80k, 16, crop 480       ``reduce``
``synthetic``      any      whole image                 300, 8, crop 64         ``train-ids``
=================  =======  ==========================  ======================  ===================================
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from offseg_hf.data.files import IGNORE_INDEX, LabelMapping, label_mapping_for
from offseg_hf.data.synthetic import synthetic_class_names
from offseg_hf.data.tables import DatasetInfo, load_dataset_info

__all__ = [
    "DATASETS",
    "DATASET_NAMES",
    "TTA_RATIOS",
    "DatasetSpec",
    "SegmentationProtocol",
    "dataset_for_num_labels",
    "get_dataset",
    "get_dataset_info",
    "identify_dataset",
    "palette_array",
]

TTA_RATIOS: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


@dataclass(frozen=True)
class SegmentationProtocol:
    """Test-time settings of one benchmark (mmsegmentation's test pipeline and ``test_cfg``).

    Attributes:
        scale: ``(long-side limit, short-side target)`` of the keep-ratio resize, e.g. ``(2048, 512)``.
        crop_size: ``(height, width)`` of the sliding window.
        stride: ``(vertical, horizontal)`` step of the sliding window.
        tta_ratios: scale ratios of multi-scale testing, applied to ``scale``.
    """

    scale: tuple[int, int]
    crop_size: tuple[int, int]
    stride: tuple[int, int]
    tta_ratios: tuple[float, ...] = TTA_RATIOS

    def __post_init__(self) -> None:
        for name in ("scale", "crop_size", "stride"):
            value = getattr(self, name)
            if len(value) != 2 or min(value) < 1:
                raise ValueError(f"SegmentationProtocol.{name} must be two positive integers, got {value!r}")
        if not self.tta_ratios or min(self.tta_ratios) <= 0:
            raise ValueError(f"SegmentationProtocol.tta_ratios must be positive, got {self.tta_ratios!r}")


@dataclass(frozen=True)
class DatasetSpec:
    """Everything about one dataset.

    Attributes:
        name: canonical name.
        title: human-readable name (model cards, messages).
        aliases: other spellings :func:`get_dataset` accepts (compared lower-case with ``-``, ``_``, spaces removed).
        protocol: the paper's test protocol; ``None`` for synthetic (whole image at its own size).
        recipe: training defaults (:mod:`offseg_hf.training`): ``max_steps``, ``global_batch_size``, ``crop_size``,
            ``train_scale``, ``eval_batch_size`` and, for synthetic, the short-run overrides.
        label_format: how released annotations map to train ids (:data:`offseg_hf.data.files.LABEL_FORMATS`); the
            default of the local loader and of Hub datasets.
        loader: ``"module:function"`` reading the official local layout (``function(data_dir, split)``; synthetic:
            ``function(split, **options)``).
        hub_datasets: Hub dataset ids known to hold this benchmark, with their columns, revision and splits.
        card: model-card facts (``hub`` dataset tag, ``slug`` of repo names, ``train_split``, ``resize``,
            ``evaluation``, ``limitations`` texts).
        has_table: whether ``tables/<name>.json`` holds its classes and palette (not synthetic, whose classes are
            generated for any count).
    """

    name: str
    title: str
    aliases: tuple[str, ...]
    protocol: SegmentationProtocol | None
    recipe: Mapping[str, Any]
    label_format: str
    loader: str
    hub_datasets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    card: Mapping[str, str] = field(default_factory=dict)
    has_table: bool = True
    ignore_index: int = IGNORE_INDEX

    @property
    def info(self) -> DatasetInfo:
        """Class names, palette and label conventions (:class:`~offseg_hf.data.tables.DatasetInfo`)."""
        if not self.has_table:
            raise ValueError(f"dataset {self.name!r} has no fixed class table (its classes are generated)")
        return load_dataset_info(self.name)

    @property
    def num_labels(self) -> int:
        return self.info.num_labels

    def label_mapping(self, num_labels: int | None = None) -> LabelMapping:
        """Raw annotation values of this dataset's releases → train ids."""
        return label_mapping_for(self.label_format, num_labels if num_labels is not None else self.num_labels)

    def training_defaults(self) -> dict[str, Any]:
        """The recipe plus the test scale of the protocol (``None``: whole images at their own size)."""
        return {**self.recipe, "test_scale": self.protocol.scale if self.protocol is not None else None}

    def load_function(self) -> Callable:
        module, _, function = self.loader.partition(":")
        return getattr(importlib.import_module(module), function)


_SLIDING_512 = SegmentationProtocol(scale=(2048, 512), crop_size=(512, 512), stride=(480, 480))

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="ade20k",
            title="ADE20K",
            aliases=("ade", "ade150", "adechallengedata2016"),
            protocol=_SLIDING_512,
            recipe={"max_steps": 160_000, "global_batch_size": 16, "crop_size": 512, "train_scale": (2048, 512),
                    "eval_batch_size": 1},
            label_format="reduce",
            loader="offseg_hf.data.ade20k:load_ade20k",
            hub_datasets={
                "zhoubolei/scene_parse_150": {
                    "revision": "refs/convert/parquet", "config_name": "scene_parsing", "image_column": "image",
                    "label_column": "annotation", "label_format": "reduce",
                    "splits": {"train": "train", "validation": "validation", "test": "test"},
                },
            },
            card={
                "hub": "scene_parse_150",
                "slug": "ade20k",
                "train_split": "training set (SceneParsing150, 20,210 images), 512×512 crops",
                "resize": "short side 512, long side at most 2048, aspect ratio kept",
                "evaluation": (
                    "ADE20K validation set (2,000 images), 150 classes. Annotations store 0 for \"no class\": labels are "
                    "reduced (0 → 255 ignored, v → v − 1; `do_reduce_labels=True` in the processor). Each image is resized "
                    "to short side 512 (long side ≤ 2048, aspect ratio kept), segmented with 512×512 sliding windows "
                    "(stride 480), and the logits are resized bilinearly to the original image size before the arg-max. "
                    "Single scale, no flipping."
                ),
                "limitations": "ADE20K covers indoor and outdoor scenes photographed in daylight; the 150 classes are the SceneParsing subset of ADE20K's vocabulary.",
            },
        ),
        DatasetSpec(
            name="coco-stuff",
            title="COCO-Stuff-164k",
            aliases=("cocostuff164k", "stuff164k"),
            protocol=_SLIDING_512,
            recipe={"max_steps": 80_000, "global_batch_size": 16, "crop_size": 512, "train_scale": (2048, 512),
                    "eval_batch_size": 1},
            label_format="coco-stuff-raw",
            loader="offseg_hf.data.coco_stuff:load_coco_stuff",
            hub_datasets={
                "GATE-engine/COCOStuff164K": {
                    "revision": None, "config_name": None, "image_column": "image", "label_column": "mask",
                    "label_format": "coco-stuff-raw", "splits": {"train": "train", "validation": "val"},
                },
            },
            card={
                "hub": "coco-stuff",
                "slug": "cocostuff",
                "train_split": "training set (118k images of COCO 2017 train), 512×512 crops",
                "resize": "short side 512, long side at most 2048, aspect ratio kept",
                "evaluation": (
                    "COCO-Stuff-164k validation set (5,000 images of COCO 2017 val), 171 classes (80 thing + 91 stuff; the "
                    "182 raw ids are mapped to 0–170 as mmsegmentation's converter does, unused ids → 255). Each image is "
                    "resized to short side 512 (long side ≤ 2048, aspect ratio kept), segmented with 512×512 sliding "
                    "windows (stride 480), logits resized bilinearly to the original size. Single scale, no flipping."
                ),
                "limitations": "COCO-Stuff labels are coarse polygons at object boundaries; stuff classes such as 'wall-other' or 'floor-other' are catch-alls.",
            },
        ),
        DatasetSpec(
            name="cityscapes",
            title="Cityscapes",
            aliases=(),
            protocol=SegmentationProtocol(scale=(2048, 1024), crop_size=(1024, 1024), stride=(768, 768)),
            recipe={"max_steps": 160_000, "global_batch_size": 8, "crop_size": 1024, "train_scale": (2048, 1024),
                    "eval_batch_size": 1},
            label_format="cityscapes-label-ids",
            loader="offseg_hf.data.cityscapes:load_cityscapes",
            card={
                "hub": "cityscapes",
                "slug": "cityscapes",
                "train_split": "training set (2,975 finely annotated images), 1024×1024 crops",
                "resize": "2048×1024 (Cityscapes' native size), aspect ratio kept",
                "evaluation": (
                    "Cityscapes validation set (500 finely annotated 2048×1024 images), the 19 evaluation classes "
                    "(`*_gtFine_labelTrainIds.png`, label ids mapped to train ids with cityscapesscripts' table, others → 255). "
                    "Images keep their 2048×1024 size and are segmented with 1024×1024 sliding windows (stride 768). "
                    "Single scale, no flipping."
                ),
                "limitations": "Cityscapes is urban street scenes from German and neighbouring cities in daytime and fair weather, seen from a car; other viewpoints, weather and countries are out of distribution.",
            },
        ),
        DatasetSpec(
            name="pascal-context",
            title="Pascal Context (59 classes)",
            aliases=("pascalcontext59", "context59"),
            # mmsegmentation's pascal_context_59 (the paper trains only ADE20K, COCO-Stuff and Cityscapes)
            protocol=SegmentationProtocol(scale=(520, 520), crop_size=(480, 480), stride=(320, 320)),
            recipe={"max_steps": 80_000, "global_batch_size": 16, "crop_size": 480, "train_scale": (520, 520),
                    "eval_batch_size": 1},
            label_format="reduce",
            loader="offseg_hf.data.pascal_context:load_pascal_context",
            card={
                "hub": "pascal-context",
                "slug": "pascal-context",
                "train_split": "training set (4,996 images), 480×480 crops",
                "resize": "long side 520, aspect ratio kept",
                "evaluation": (
                    "Pascal Context validation set (5,104 images), 59 classes; raw 0 (background) is ignored (labels reduced). "
                    "Images are resized to long side 520 and segmented with 480×480 sliding windows (stride 320)."
                ),
                "limitations": "Pascal Context's 59-class setting ignores the background class, so the model never predicts 'background'.",
            },
        ),
        DatasetSpec(
            name="synthetic",
            title="synthetic scenes",
            aliases=(),
            protocol=None,
            # CPU-sized: 64×64 scenes, resized by 0.5–2.0 and cropped back to 64.
            recipe={"max_steps": 300, "global_batch_size": 8, "crop_size": 64, "train_scale": (64, 64),
                    "eval_batch_size": 8, "warmup_steps": 30, "eval_steps": 100, "logging_steps": 10,
                    "learning_rate": 6e-4},
            label_format="train-ids",
            loader="offseg_hf.data.synthetic:load_synthetic",
            has_table=False,
        ),
    )
}

DATASET_NAMES: tuple[str, ...] = tuple(name for name, spec in DATASETS.items() if spec.has_table)
"""The benchmarks with a label table (the paper's datasets): every dataset but synthetic."""


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch not in "-_ ")


_BY_KEY = {_key(alias): spec for spec in DATASETS.values() for alias in (spec.name, *spec.aliases)}


def get_dataset(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of ``name`` (canonical or alias; case and ``-``/``_``/space ignored).

    Raises:
        ValueError: unknown name (the message lists the choices).
    """
    spec = _BY_KEY.get(_key(name))
    if spec is None:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return spec


def get_dataset_info(name: str) -> DatasetInfo:
    """The :class:`~offseg_hf.data.tables.DatasetInfo` (class names, palette, conventions) of a benchmark.

    Args:
        name: ``"ade20k"``, ``"coco-stuff"``, ``"cityscapes"`` or ``"pascal-context"``, or an alias such as
            ``"ade"``, ``"cocostuff"``, ``"coco_stuff164k"``, ``"pascal_context_59"``.

    Raises:
        ValueError: unknown name or a dataset without a label table (the message lists the benchmarks).
    """
    spec = _BY_KEY.get(_key(name))
    if spec is None or not spec.has_table:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return spec.info


def dataset_for_num_labels(num_labels: int) -> DatasetInfo | None:
    """The benchmark with ``num_labels`` classes (150, 171, 19, 59), or ``None`` if there is none."""
    for name in DATASET_NAMES:
        info = get_dataset_info(name)
        if info.num_labels == num_labels:
            return info
    return None


def _normalised(name: str) -> str:
    return " ".join(str(name).lower().split())


def identify_dataset(class_names: Sequence[str] | None, num_labels: int | None = None) -> tuple[str | None, bool]:
    """Which dataset a model's (or a checkpoint's) classes belong to: the one rule of the package.

    The class names decide when given: the benchmark whose names are the same, in the same order (compared
    case-insensitively with whitespace collapsed), or ``"synthetic"`` for the synthetic scenes' names. Otherwise
    the class count: the benchmark with ``num_labels`` (default ``len(class_names)``) classes.

    Returns:
        ``(name, by_names)``: the dataset name (``None`` when neither rule finds one) and whether the names matched
        (``False``: only the count did, so the names, if any, differ from the dataset's).
    """
    count = num_labels if num_labels is not None else len(class_names or ())
    if class_names:
        names = [_normalised(name) for name in class_names]
        for name in DATASET_NAMES:
            if [_normalised(n) for n in get_dataset_info(name).class_names] == names:
                return name, True
        if len(names) >= 2 and names == [_normalised(n) for n in synthetic_class_names(len(names))]:
            return "synthetic", True
    info = dataset_for_num_labels(count)
    return (info.name if info is not None else None), False


def palette_array(info: DatasetInfo | str) -> np.ndarray:
    """The palette as a ``uint8`` array of shape ``(num_labels, 3)`` (RGB), for ``palette[label_map]``."""
    if isinstance(info, str):
        info = get_dataset_info(info)
    return np.asarray(info.palette, dtype=np.uint8).reshape(info.num_labels, 3)
