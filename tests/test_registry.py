"""The dataset registry: one spec per dataset, and every other module reads its facts from there."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from offseg_hf.data.hub import KNOWN_HUB_DATASETS
from offseg_hf.data.registry import DATASET_NAMES, DATASETS, get_dataset, get_dataset_info, identify_dataset
from offseg_hf.data.synthetic import synthetic_class_names
from offseg_hf.inference.segment import PROTOCOLS, get_protocol

COUNTS = {"ade20k": 150, "coco-stuff": 171, "cityscapes": 19, "pascal-context": 59}


def test_every_benchmark_has_a_complete_spec():
    assert DATASET_NAMES == tuple(COUNTS) and set(DATASETS) == {*COUNTS, "synthetic"}
    for name, spec in DATASETS.items():
        assert get_dataset(name) is spec and get_dataset(name.upper().replace("-", "_")) is spec
        for alias in spec.aliases:
            assert get_dataset(alias) is spec
        assert callable(spec.load_function())
        assert {"max_steps", "global_batch_size", "crop_size", "train_scale", "eval_batch_size"} <= set(spec.recipe)
        if name in COUNTS:
            assert spec.num_labels == get_dataset_info(name).num_labels == COUNTS[name]
            assert spec.protocol is PROTOCOLS[name] and get_protocol(name) is spec.protocol
            assert {"hub", "slug", "train_split", "resize", "evaluation", "limitations"} <= set(spec.card)
    with pytest.raises(ValueError, match="unknown dataset 'voc'"):
        get_dataset("voc")
    with pytest.raises(ValueError, match="unknown dataset 'synthetic'"):
        get_dataset_info("synthetic")  # generated classes: no table


def test_the_other_tables_are_views_of_the_specs():
    from offseg_hf.training.train import RECIPES, resolve_config

    for name, spec in DATASETS.items():
        assert RECIPES[name]["test_scale"] == (spec.protocol.scale if spec.protocol else None)
        assert RECIPES[name]["max_steps"] == spec.recipe["max_steps"]
    assert resolve_config({"dataset": "ADE"}).data_args.test_scale == [2048, 512]
    for hub_id, settings in KNOWN_HUB_DATASETS.items():
        spec = get_dataset(settings["dataset"])
        assert spec.hub_datasets[hub_id]["label_column"] == settings["label_column"]
    assert {KNOWN_HUB_DATASETS[h]["dataset"] for h in KNOWN_HUB_DATASETS} == {"ade20k", "coco-stuff"}


def test_label_mappings_come_from_the_spec():
    ade = get_dataset("ade20k").label_mapping()
    assert ade(np.array([[0, 1, 150]], dtype=np.uint8)).tolist() == [[255, 0, 149]]
    coco = get_dataset("coco-stuff").label_mapping()
    assert coco(np.array([[0, 11, 12]], dtype=np.uint8)).tolist() == [[0, 255, 11]]  # raw id 11 is unused
    city = get_dataset("cityscapes").label_mapping()
    assert city(np.array([[7, 26, 0]], dtype=np.uint8)).tolist() == [[0, 13, 255]]


def test_one_rule_tells_which_dataset_class_names_belong_to(caplog):
    from offseg_hf.conversion.convert import resolve_dataset
    from offseg_hf.inference.visualize import resolve_palette

    ade = list(get_dataset_info("ade20k").class_names)
    shouting = [name.upper() + " " for name in ade]
    assert identify_dataset(ade) == ("ade20k", True)
    assert identify_dataset(shouting) == ("ade20k", True)  # case and whitespace do not matter
    assert identify_dataset(list(reversed(ade))) == ("ade20k", False)  # only the count matches
    assert identify_dataset(synthetic_class_names(6)) == ("synthetic", True)
    assert identify_dataset([f"c{i}" for i in range(7)]) == (None, False)
    # the palette of a model and the dataset of a checkpoint follow the same rule
    assert resolve_palette(dict(enumerate(shouting)))[1] == "ade20k"
    with caplog.at_level(logging.WARNING, logger="offseg_hf.conversion"):
        assert resolve_dataset(150, meta={"dataset_meta": {"classes": shouting}}).name == "ade20k"
        assert "differ" not in caplog.text
        assert resolve_dataset(150, meta={"dataset_meta": {"classes": list(reversed(ade))}}).name == "ade20k"
        assert "differ from ade20k's" in caplog.text
