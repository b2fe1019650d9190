"""Dataset loaders on small generated folders in the official layouts, and the synthetic dataset."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from offseg_hf.data.files import LabelMapping

from offseg_hf.data.loading import load_segmentation_dataset

SIZE = (12, 16)  # (H, W)


def _write_pair(image_path: Path, label_path: Path, label: np.ndarray, seed: int = 0) -> None:
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*label.shape, 3), dtype=np.uint8)).save(image_path)
    Image.fromarray(label.astype(np.uint8), mode="L").save(label_path)


def _label(values: list[int]) -> np.ndarray:
    """A SIZE label map whose first pixels are ``values`` and the rest ``values[0]``."""
    label = np.full(SIZE, values[0], dtype=np.uint8)
    label.ravel()[: len(values)] = values
    return label


def _train_ids(row) -> np.ndarray:
    assert row["image"].mode == "RGB" and row["label"].mode == "L"
    assert (row["image"].height, row["image"].width) == SIZE
    return np.asarray(row["label"])


def test_ade20k_reduces_labels_once(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for split, folder in (("train", "training"), ("val", "validation")):
        for i in range(2):
            stem = f"ADE_{split}_{i:08d}"
            _write_pair(root / "images" / folder / f"{stem}.jpg", root / "annotations" / folder / f"{stem}.png",
                        _label([0, 1, 150, 7]), seed=i)
    ds = load_segmentation_dataset("ade20k", "train", data_dir=tmp_path)
    assert len(ds) == 2 and ds[1]["index"] == 1
    np.testing.assert_array_equal(_train_ids(ds[0]).ravel()[:4], [255, 0, 149, 6])
    assert len(load_segmentation_dataset("ade20k", "validation", data_dir=root)) == 2


def test_ade20k_bad_label_value_names_file_and_value(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    _write_pair(root / "images/training/a.jpg", root / "annotations/training/a.png", _label([3, 200]))
    ds = load_segmentation_dataset("ade20k", "train", data_dir=root)
    with pytest.raises(ValueError, match=r"a\.png.*label value 200"):
        ds[0]


def test_ade20k_missing_annotation_is_named(tmp_path):
    # loading lists the pairs; the image without annotation is named by the dataset check and when read
    from offseg_hf.data.check import check_dataset

    root = tmp_path / "ADEChallengeData2016"
    _write_pair(root / "images/training/a.jpg", root / "annotations/training/a.png", _label([1]))
    (root / "images/training/b.jpg").write_bytes((root / "images/training/a.jpg").read_bytes())
    ds = load_segmentation_dataset("ade20k", "train", data_dir=root)
    report = check_dataset(ds, "ade20k train")
    assert [p.index for p in report.problems] == [1]
    assert str(report.problems[0]) == f"{root / 'images/training/b.jpg'} has no annotation {root / 'annotations/training/b.png'}"
    with pytest.raises(FileNotFoundError, match=r"b\.jpg has no annotation .*b\.png"):
        ds[1]


def test_coco_stuff_raw_ids_mapped_like_the_converter(tmp_path):
    # released layout: train2017/ + stuffthingmaps_trainval2017/train2017/
    raw = [0, 11, 12, 91, 181, 255]  # person, unused id, stop sign, banner, wood, unlabeled
    _write_pair(tmp_path / "train2017/000000000009.jpg",
                tmp_path / "stuffthingmaps_trainval2017/train2017/000000000009.png", _label(raw))
    ds = load_segmentation_dataset("coco-stuff", "train", data_dir=tmp_path)
    np.testing.assert_array_equal(_train_ids(ds[0]).ravel()[:6], [0, 255, 11, 80, 170, 255])


def test_coco_stuff_converted_train_ids_used_as_is(tmp_path):
    # mmsegmentation layout with *_labelTrainIds.png already written
    _write_pair(tmp_path / "images/val2017/1.jpg", tmp_path / "annotations/val2017/1_labelTrainIds.png",
                _label([5, 170, 255]))
    ds = load_segmentation_dataset("coco-stuff", "val", data_dir=tmp_path)
    np.testing.assert_array_equal(_train_ids(ds[0]).ravel()[:3], [5, 170, 255])


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    stem = "aachen_000000_000019"
    _write_pair(tmp_path / f"leftImg8bit/train/aachen/{stem}_leftImg8bit.png",
                tmp_path / f"gtFine/train/aachen/{stem}_gtFine_labelIds.png", _label([7, 8, 24, 26, 0, 33]))
    ds = load_segmentation_dataset("cityscapes", "train", data_dir=tmp_path)
    # road 0, sidewalk 1, person 11, car 13, unlabeled 255, bicycle 18
    np.testing.assert_array_equal(_train_ids(ds[0]).ravel()[:6], [0, 1, 11, 13, 255, 18])


def test_cityscapes_prefers_label_train_ids(tmp_path):
    stem = "bonn_000000_000019"
    _write_pair(tmp_path / f"leftImg8bit/val/bonn/{stem}_leftImg8bit.png",
                tmp_path / f"gtFine/val/bonn/{stem}_gtFine_labelTrainIds.png", _label([3, 18, 255]))
    Image.fromarray(_label([7])).save(tmp_path / f"gtFine/val/bonn/{stem}_gtFine_labelIds.png")
    ds = load_segmentation_dataset("cityscapes", "val", data_dir=tmp_path)
    np.testing.assert_array_equal(_train_ids(ds[0]).ravel()[:3], [3, 18, 255])


def test_pascal_context_split_list_and_reduce(tmp_path):
    root = tmp_path / "VOCdevkit/VOC2010"
    for name in ("2008_000002", "2008_000003"):
        _write_pair(root / f"JPEGImages/{name}.jpg", root / f"SegmentationClassContext/{name}.png", _label([0, 1, 59]))
    (root / "ImageSets/SegmentationContext").mkdir(parents=True)
    (root / "ImageSets/SegmentationContext/train.txt").write_text("2008_000002\n")
    (root / "ImageSets/SegmentationContext/val.txt").write_text("2008_000003\n2008_000002\n")
    assert len(load_segmentation_dataset("pascal-context", "train", data_dir=tmp_path)) == 1
    ds = load_segmentation_dataset("pascal-context", "val", data_dir=tmp_path)
    assert len(ds) == 2
    np.testing.assert_array_equal(_train_ids(ds[0]).ravel()[:3], [255, 0, 58])


def test_hub_loader_streams_local_parquet(tmp_path):
    """The Hub path (streaming parquet) on a local parquet folder shaped like scene_parse_150."""
    import datasets

    from offseg_hf.data.hub import load_hub_dataset

    rows = {"image": [], "annotation": [], "scene_category": []}
    for i in range(3):
        rows["image"].append(Image.fromarray(np.full((*SIZE, 3), 10 * i, dtype=np.uint8)))
        rows["annotation"].append(Image.fromarray(_label([0, 1, 150]), mode="L"))
        rows["scene_category"].append(i)
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image(),
                                  "scene_category": datasets.Value("int64")})
    (tmp_path / "data").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "data/train-00000-of-00001.parquet"))
    stream = load_hub_dataset(str(tmp_path), "train", dataset="ade20k", label_column="annotation")
    assert isinstance(stream, datasets.IterableDataset)
    rows_out = list(stream)
    assert [r["index"] for r in rows_out] == [0, 1, 2]
    np.testing.assert_array_equal(_train_ids(rows_out[0]).ravel()[:3], [255, 0, 149])
    with pytest.raises(KeyError, match="'mask'"):
        next(iter(load_hub_dataset(str(tmp_path), "train", dataset="ade20k", label_column="mask")))


def test_label_mapping_rejects_out_of_range():
    with pytest.raises(ValueError, match="label value 19"):
        LabelMapping.identity(19)(np.array([[0, 19]], dtype=np.uint8), source="x.png")


def test_synthetic_is_deterministic_and_structured():
    a = load_segmentation_dataset("synthetic", "train", num_labels=6, num_samples=4, image_size=48, seed=3)
    b = load_segmentation_dataset("synthetic", "train", num_labels=6, num_samples=4, image_size=48, seed=3)
    v = load_segmentation_dataset("synthetic", "validation", num_labels=6, num_samples=4, image_size=48, seed=3)
    assert len(a) == 4
    np.testing.assert_array_equal(np.asarray(a[2]["image"]), np.asarray(b[2]["image"]))
    assert not np.array_equal(np.asarray(a[2]["image"]), np.asarray(v[2]["image"]))
    label = np.asarray(a[2]["label"])
    assert label.shape == (48, 48) and label.max() < 6
    # spatial structure: most horizontally adjacent pixels share a class
    assert (label[:, 1:] == label[:, :-1]).mean() > 0.9
