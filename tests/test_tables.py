"""Label tables: counts, names at known indices, palettes and raw-id remappings."""

import numpy as np
import pytest

from offseg_hf.data.registry import DATASET_NAMES, dataset_for_num_labels, get_dataset_info, palette_array
from offseg_hf.data.tables import (
    CITYSCAPES_LABEL_ID_TO_TRAIN_ID,
    COCO_STUFF_ID_TO_TRAIN_ID,
    DatasetInfo,
    lookup_table,
)

EXPECTED = {
    # name: (num_labels, reduce_labels, {index: name}, {index: rgb})
    "ade20k": (
        150,
        True,
        {0: "wall", 1: "building", 2: "sky", 7: "bed", 12: "person", 20: "car", 149: "flag"},
        {0: (120, 120, 120), 1: (180, 120, 120), 149: (92, 0, 255)},
    ),
    "coco-stuff": (
        171,
        False,
        {0: "person", 1: "bicycle", 79: "toothbrush", 80: "banner", 94: "clouds", 170: "wood"},
        {0: (0, 192, 64), 1: (0, 192, 64), 170: (64, 64, 0)},
    ),
    "cityscapes": (
        19,
        False,
        {0: "road", 1: "sidewalk", 10: "sky", 11: "person", 13: "car", 18: "bicycle"},
        {0: (128, 64, 128), 10: (70, 130, 180), 18: (119, 11, 32)},
    ),
    "pascal-context": (
        59,
        True,
        {0: "aeroplane", 1: "bag", 36: "person", 46: "sky", 58: "wood"},
        {0: (180, 120, 120), 58: (31, 0, 255)},
    ),
}


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_counts_names_palettes(name):
    num_labels, reduce_labels, names, colours = EXPECTED[name]
    info = get_dataset_info(name)
    assert isinstance(info, DatasetInfo)
    assert info.name == name
    assert info.num_labels == num_labels == len(info.class_names) == len(info.palette)
    assert info.reduce_labels is reduce_labels
    assert info.ignore_index == 255
    for index, class_name in names.items():
        assert info.class_names[index] == class_name
    for index, rgb in colours.items():
        assert info.palette[index] == rgb
    # names are unique, stripped, non-empty; id2label / label2id are inverse
    assert len(set(info.class_names)) == num_labels
    assert all(n and n == n.strip() for n in info.class_names)
    assert info.id2label == {i: n for i, n in enumerate(info.class_names)}
    assert {v: k for k, v in info.id2label.items()} == info.label2id
    pal = palette_array(info)
    assert pal.dtype == np.uint8 and pal.shape == (num_labels, 3)
    assert all(isinstance(c, int) and 0 <= c <= 255 for rgb in info.palette for c in rgb)
    np.testing.assert_array_equal(palette_array(name), pal)


def test_dataset_info_is_frozen_and_checked():
    info = get_dataset_info("cityscapes")
    with pytest.raises(AttributeError):
        info.name = "other"
    with pytest.raises(ValueError, match="2 class names but 1 palette"):
        DatasetInfo("x", ("a", "b"), ((0, 0, 0),))


@pytest.mark.parametrize(
    "alias, canonical",
    [
        ("ade", "ade20k"),
        ("ADE20K", "ade20k"),
        ("ade_20k", "ade20k"),
        ("coco_stuff", "coco-stuff"),
        ("cocostuff", "coco-stuff"),
        ("coco-stuff164k", "coco-stuff"),
        ("Cityscapes", "cityscapes"),
        ("pascal_context", "pascal-context"),
        ("pascal-context-59", "pascal-context"),
    ],
)
def test_aliases(alias, canonical):
    assert get_dataset_info(alias).name == canonical


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError) as error:
        get_dataset_info("voc")
    message = str(error.value)
    assert "'voc'" in message
    for name in DATASET_NAMES:
        assert name in message


def test_dataset_for_num_labels():
    assert dataset_for_num_labels(150).name == "ade20k"
    assert dataset_for_num_labels(171).name == "coco-stuff"
    assert dataset_for_num_labels(19).name == "cityscapes"
    assert dataset_for_num_labels(59).name == "pascal-context"
    assert dataset_for_num_labels(60) is None
    assert dataset_for_num_labels(1) is None


def test_coco_stuff_id_to_train_id():
    mapping = COCO_STUFF_ID_TO_TRAIN_ID
    assert len(mapping) == 171
    assert sorted(mapping.values()) == list(range(171))
    assert max(mapping) == 181
    # the 11 COCO thing ids that were never annotated (0-based) are unused
    assert sorted(set(range(182)) - set(mapping)) == [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90]
    assert mapping[0] == 0 and mapping[10] == 10 and mapping[12] == 11 and mapping[181] == 170
    info = get_dataset_info("coco-stuff")
    # raw 91 is the first stuff class ('banner') = train id 80
    assert info.class_names[mapping[91]] == "banner"
    lut = lookup_table(mapping)
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    raw = np.array([[0, 11, 12], [181, 255, 182]], dtype=np.uint8)
    np.testing.assert_array_equal(lut[raw], [[0, 255, 11], [170, 255, 255]])


def test_cityscapes_label_id_to_train_id():
    mapping = CITYSCAPES_LABEL_ID_TO_TRAIN_ID
    assert sorted(mapping) == list(range(34))
    assert sorted(v for v in mapping.values() if v != 255) == list(range(19))
    names = get_dataset_info("cityscapes").class_names
    # cityscapesscripts: road 7, sidewalk 8, sky 23, car 26, bicycle 33; parking 9 / caravan 29 ignored
    assert {names[mapping[i]] for i in (7, 8, 23, 26, 33)} == {"road", "sidewalk", "sky", "car", "bicycle"}
    assert mapping[7] == 0 and mapping[26] == 13 and mapping[33] == 18
    assert mapping[0] == mapping[9] == mapping[29] == 255
    lut = lookup_table(mapping)
    assert lut[7] == 0 and lut[34] == 255 and lut[255] == 255
