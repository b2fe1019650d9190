"""`offseg train --model segnext-t-offset`: the SegNeXt recipe, a short synthetic run that resumes, then evaluate / predict."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offseg_hf import SegNextConfig, SegNextForSemanticSegmentation
from offseg_hf.training.train import build_model, build_param_groups, resolve_config

REPO = Path(__file__).resolve().parents[1]


def test_param_groups_of_segnext_t_offset():
    model = SegNextForSemanticSegmentation(SegNextConfig.from_preset("segnext-t-offset", num_labels=5))
    groups = {g["name"]: g for g in build_param_groups(model, learning_rate=6e-5, weight_decay=0.01)}
    assert groups["backbone"]["lr"] == pytest.approx(6e-5) and groups["head"]["lr"] == pytest.approx(6e-4)
    names = {key: set(g["param_names"]) for key, g in groups.items()}
    assert sum(len(v) for v in names.values()) == len(list(model.parameters()))
    assert "backbone.stages.0.blocks.0.norm1.weight" in names["backbone_no_decay"]  # BatchNorm
    assert "backbone.stages.3.norm.bias" in names["backbone_no_decay"]  # stage LayerNorm
    assert "backbone.stages.0.blocks.0.layer_scale_1" in names["backbone"]
    assert {"decode_head.hamburger.ham_out.norm.weight", "offset_learning.mask_norm.weight"} <= names["head_no_decay"]
    assert {"decode_head.hamburger.ham_in.weight", "offset_learning.class_embeddings"} <= names["head"]


def test_model_factory_presets(tmp_path):
    labels = {0: "a", 1: "b", 2: "c"}
    offset = build_model(resolve_config({"model": "segnext-t-offset"}), labels)
    assert offset.config.classifier == "offset_learning" and offset.config.id2label == labels
    plain = build_model(resolve_config({"model": "segnext-s"}), labels)
    assert plain.config.classifier == "per_pixel" and plain.config.backbone_config.depths == [2, 2, 4, 2]
    with pytest.raises(ValueError, match="use segnext-t for the per-pixel classifier"):
        build_model(resolve_config({"model": "segnext-t-offset", "classifier": "per-pixel"}), labels)
    offset.backbone.save_pretrained(tmp_path / "mscan")
    plain.save_pretrained(tmp_path / "plain")
    refit = build_model(resolve_config({"model": str(tmp_path / "plain")}), {0: "x", 1: "y"})
    assert isinstance(refit, SegNextForSemanticSegmentation) and refit.classifier.out_channels == 2
    started = build_model(resolve_config({"model": "segnext-t", "backbone_weights": str(tmp_path / "mscan")}), labels)
    assert torch.equal(started.backbone.stages[2].blocks[0].mlp.fc1.weight, offset.backbone.stages[2].blocks[0].mlp.fc1.weight)


def _train(output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "offseg_hf", "train", "--model", "segnext-t-offset", "--dataset", "synthetic",
        "--output-dir", str(output_dir), "--max-steps", "4", "--save-steps", "2", "--eval-steps", "2",
        "--global-batch-size", "2", "--num-labels", "4", "--image-size", "64", "--crop-size", "64",
        "--train-scale", "64", "64", "--train-samples", "8", "--eval-samples", "2", "--eval-batch-size", "2",
        "--warmup-steps", "2", "--logging-steps", "1", "--num-workers", "0", "--use-cpu", *extra,
    ]
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def evaluate_agrees_with_the_trainer(folder: Path) -> dict[str, str]:
    """``offseg evaluate`` of a trained tiny folder on its 2 synthetic validation images gives the mIoU the Trainer's
    final evaluation recorded; returns the subprocess environment for further commands."""
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    evaluate = subprocess.run(
        [sys.executable, "-m", "offseg_hf", "evaluate", "--model", str(folder), "--dataset", "synthetic",
         "--device", "cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    report = json.loads(next(folder.glob("eval_synthetic_validation_whole*.json")).read_text())["metrics"]
    assert report["num_images"] == 2
    final = json.loads((folder / "eval_results.json").read_text())
    assert report["mIoU"] == pytest.approx(final["eval_mIoU"], abs=1e-6)
    return env


def _losses(output_dir: Path) -> dict[int, float]:
    history = json.loads((output_dir / "log_history.json").read_text())
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.mark.slow
def test_train_resume_evaluate_predict(tmp_path):
    reference = tmp_path / "reference"
    result = _train(reference)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((reference / "config.json").read_text())
    assert config["model_type"] == "segnext" and config["classifier"] == "offset_learning"
    metrics = json.loads((reference / "eval_results.json").read_text())
    assert 0.0 <= metrics["eval_mIoU"] <= 1.0

    # interrupted after step 2: resume continues with the same losses (the NMF bases come from the restored RNG)
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    result = _train(resumed, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {resumed / 'checkpoint-2'}" in result.stderr
    expected, got = _losses(reference), _losses(resumed)
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), step

    env = evaluate_agrees_with_the_trainer(resumed)  # the deterministic NMF bases make the two evaluations equal
    sample = resumed / "samples" / "val_000.png"
    predict = subprocess.run(
        [sys.executable, "-m", "offseg_hf", "predict", str(sample), "--model", str(resumed), "--out",
         str(tmp_path / "predictions"), "--device", "cpu", "--quiet"], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=600,
    )
    assert predict.returncode == 0, predict.stderr[-3000:]
    assert (tmp_path / "predictions" / "val_000_labels.png").is_file()
