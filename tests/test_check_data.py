"""The dataset check and the bad-dataset cases a new user meets: each ends in one message that names the
file and its problem, a non-zero exit status and no traceback; ``--skip-bad-samples`` trains on the rest."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from offseg_hf.cli import main
from offseg_hf.data.check import DataCheckError, check_dataset, ensure_clean
from offseg_hf.data.loading import load_segmentation_dataset
from offseg_hf.data.pipeline import SegmentationCollator

REPO = Path(__file__).resolve().parents[1]
H, W = 24, 32


def _pair(root: Path, stem: str, label: np.ndarray | None = None, image_size=(H, W), seed=0) -> tuple[Path, Path]:
    image = root / "images" / "training" / f"{stem}.jpg"
    annotation = root / "annotations" / "training" / f"{stem}.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    annotation.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*image_size, 3), dtype=np.uint8)).save(image)
    if label is None:
        label = rng.integers(0, 151, image_size, dtype=np.uint8)
    if label is not False:
        Image.fromarray(label.astype(np.uint8), mode="L").save(annotation)
    return image, annotation


def _ade(tmp_path: Path, bad: str | None = None) -> tuple[Path, Path | None]:
    """An ADE20K layout of 3 good training pairs (+ 2 validation pairs) and one bad pair of kind ``bad``."""
    root = tmp_path / "ADEChallengeData2016"
    for i in range(3):
        _pair(root, f"good_{i}", seed=i)
    for i in range(2):
        image, label = _pair(root, f"val_{i}", seed=10 + i)
        for path in (image, label):
            target = path.parent.parent / "validation" / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
    culprit = None
    if bad == "no-annotation":
        culprit, _ = _pair(root, "bad", label=False)
    elif bad == "size":
        image, culprit = _pair(root, "bad")
        Image.fromarray(np.zeros((H + 2, W), dtype=np.uint8), mode="L").save(culprit)
    elif bad == "value":
        label = np.full((H, W), 3, dtype=np.uint8)
        label[0, :5] = 200  # ADE20K annotations hold 0..150
        _, culprit = _pair(root, "bad", label=label)
    elif bad == "unreadable":
        culprit, _ = _pair(root, "bad")
        culprit.write_bytes(b"not a jpeg at all")
    return root, culprit


def _train(root, tmp_path, *extra):
    from test_training import tiny_config
    from offseg_hf import OffSegForSemanticSegmentation

    model = tmp_path / "model"
    if not model.exists():
        torch.manual_seed(0)
        OffSegForSemanticSegmentation(tiny_config(150)).save_pretrained(model)
    return ["train", "--dataset", "ade20k", "--data-dir", str(root), "--model", str(model), "--output-dir",
            str(tmp_path / "out"), "--max-steps", "2", "--global-batch-size", "2", "--crop-size", "32",
            "--train-scale", "32", "32", "--test-scale", "32", "32", "--warmup-steps", "1", "--num-workers", "0",
            "--use-cpu", "--quiet", *extra]


@pytest.mark.parametrize("bad, problem", [
    ("no-annotation", "has no annotation"),
    ("size", f"label map is {W}×{H + 2} but its image"),
    ("unreadable", "not a readable image"),
])
def test_fast_check_stops_training_before_the_model_with_one_message(tmp_path, capsys, bad, problem):
    root, culprit = _ade(tmp_path, bad)
    status = main(_train(root, tmp_path))
    err = capsys.readouterr().err
    assert status == 1
    assert "Traceback" not in err and "--debug" in err
    assert "ade20k train: 1 of 4 samples checked (fast) have problems:" in err
    line = next(l for l in err.splitlines() if str(culprit) in l)
    assert problem in line
    assert "--skip-bad-samples" in err
    assert not (tmp_path / "out" / "checkpoint-1").exists()


def test_bad_label_value_is_named_with_its_file(tmp_path, capsys):
    root, culprit = _ade(tmp_path, "value")
    # offseg check-data reads every sample: the value and the file are named
    status = main(["check-data", "--dataset", "ade20k", "--data-dir", str(root), "--split", "train", "--quiet"])
    out = capsys.readouterr().out
    assert status == 1
    assert f"{culprit}: label value 200 (5 pixels) not valid for raw 0..150 with 0 = ignore" in out
    # training without the full check meets it in the data loader (worker process): still one line
    status = main(_train(root, tmp_path, "--num-workers", "1", "--max-steps", "4"))
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err and "Original" not in err
    assert f"{culprit}: label value 200 (5 pixels) not valid" in err


def test_skip_bad_samples_trains_on_the_rest_and_reports_the_count(tmp_path, capsys, caplog):
    root, culprit = _ade(tmp_path, "value")
    status = main(_train(root, tmp_path, "--skip-bad-samples", "--global-batch-size", "3"))
    captured = capsys.readouterr()
    assert status == 0, captured.err[-2000:]
    assert "--skip-bad-samples: skipped 1 of 4 samples of ade20k train, using 3" in captured.err + caplog.text
    assert str(culprit) in captured.err + caplog.text
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_empty_and_missing_data_dir(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--dataset", "ade20k", "--data-dir", str(tmp_path / "empty"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "images/training" in err and "offseg train: error:" in err
    assert main(["train", "--dataset", "ade20k", "--quiet"]) == 1
    assert "dataset 'ade20k' needs --data-dir" in capsys.readouterr().err
    assert main(["check-data", "--dataset", "ade20k", "--data-dir", str(tmp_path / "nope")]) == 1
    assert "nope" in capsys.readouterr().err


def test_check_data_clean_dataset_and_debug_shows_traceback(tmp_path, capsys):
    root, _ = _ade(tmp_path)
    assert main(["check-data", "--dataset", "ade20k", "--data-dir", str(root), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "ade20k train: 3 of 3 samples checked (full), no problems" in out
    assert "ade20k validation: 2 of 2 samples checked (full), no problems" in out
    with pytest.raises(ValueError, match="needs --data-dir"):
        main(["check-data", "--dataset", "ade20k", "--debug"])


def test_cli_error_is_one_line_in_a_real_process(tmp_path):
    root, culprit = _ade(tmp_path, "size")
    result = subprocess.run([sys.executable, "-m", "offseg_hf", "check-data", "--dataset", "ade20k", "--data-dir",
                             str(root), "--split", "train", "--fast"], cwd=REPO, capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{culprit}: label map is {W}×{H + 2}" in result.stdout


def test_ensure_clean_skips_by_index_and_keeps_the_reader(tmp_path):
    root, culprit = _ade(tmp_path, "no-annotation")
    data = load_segmentation_dataset("ade20k", "train", data_dir=root)
    with pytest.raises(DataCheckError, match="has no annotation"):
        ensure_clean(data, "ade20k train")
    kept = ensure_clean(data, "ade20k train", skip_bad_samples=True)
    assert len(kept) == 3 and [row["index"] for row in kept] == [1, 2, 3]  # "bad" sorts first
    assert kept[0]["label"].mode == "L"
    assert check_dataset(kept, "kept").ok


def test_collator_names_label_values_outside_the_model_classes_and_maps_the_ignore_index():
    examples = [{"pixel_values": torch.zeros(3, 2, 2), "labels": torch.tensor([[0, 1], [255, 3]]), "index": 7},
                {"pixel_values": torch.zeros(3, 2, 2), "labels": torch.tensor([[0, 9], [4, 1]]), "index": 8}]
    with pytest.raises(ValueError, match=r"sample 8 \(dataset row\): label values 4, 9 outside the model's classes 0..3"):
        SegmentationCollator(4, ignore_index=255)(examples)
    batch = SegmentationCollator(10, ignore_index=-100)(examples)
    assert batch["labels"][0].tolist() == [[0, 1], [-100, 3]] and set(batch) == {"pixel_values", "labels"}
