"""``offseg evaluate`` end to end on a tiny model and the synthetic dataset: whole, slide and TTA."""

import json

import pytest
import torch

from offseg_hf import OffSegForSemanticSegmentation
from offseg_hf.cli import main
from offseg_hf.inference.image_processing_offseg import build_image_processor


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    from test_training import tiny_config

    path = tmp_path_factory.mktemp("tiny_eval_model")
    torch.manual_seed(0)
    OffSegForSemanticSegmentation(tiny_config(4)).save_pretrained(path)
    build_image_processor("synthetic", scale=(32, 32)).save_pretrained(path)
    return path


@pytest.mark.parametrize("extra", [[], ["--mode", "slide"], ["--tta"]])
def test_evaluate_command_writes_json_and_markdown(tiny_model_folder, tmp_path, extra, capsys):
    status = main(["evaluate", "--model", str(tiny_model_folder), "--dataset", "synthetic", "--eval-samples", "2",
                   "--image-size", "32", "--output-dir", str(tmp_path), "--device", "cpu", *extra])
    assert status == 0
    name = "eval_synthetic_validation_" + ("slide" if "slide" in extra else "whole") + ("_tta" if "--tta" in extra else "")
    report = json.loads((tmp_path / f"{name}.json").read_text())
    metrics = report["metrics"]
    assert metrics["num_images"] == 2 and 0.0 <= metrics["mIoU"] <= 1.0
    assert len(metrics["per_class_iou"]) == 4 and report["settings"]["tta"] == ("--tta" in extra)
    table = (tmp_path / f"{name}.md").read_text()
    assert "| aAcc | mIoU | mAcc |" in table and "mIoU" in capsys.readouterr().out


def test_evaluate_rejects_wrong_class_count(tiny_model_folder, tmp_path):
    with pytest.raises(SystemExit, match="4 classes"):
        main(["evaluate", "--model", str(tiny_model_folder), "--dataset", "synthetic", "--num-labels", "7",
              "--output-dir", str(tmp_path)])
