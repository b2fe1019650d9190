"""`offseg train` for Mask2Former (+ offset learning): the reference's targets and recipe, a short run that resumes,
then `offseg evaluate` / `offseg predict` on the result (tiny model; the full preset is checked by its size)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import offseg_hf  # noqa: F401  (activates the models with the Auto classes)
from offseg_hf.data.pipeline import semantic_to_mask_targets
from offseg_hf.training.train import build_model, build_param_groups, resolve_config
from test_mask2former_inference import tiny_config
from test_training_segnext import _losses, evaluate_agrees_with_the_trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from offseg_hf.models import Mask2FormerOffsetForUniversalSegmentation

    path = tmp_path_factory.mktemp("m2f-tiny")
    torch.manual_seed(0)
    Mask2FormerOffsetForUniversalSegmentation(tiny_config(num_labels=4)).save_pretrained(path)
    return str(path)


def test_label_maps_become_one_mask_per_class_present(tiny_folder):
    labels = torch.tensor([[[3, 3, 255], [0, 3, 1]], [[255, 255, 255], [255, 255, 255]]])
    masks, classes = semantic_to_mask_targets(labels, ignore_index=255)
    assert classes[0].tolist() == [0, 1, 3] and classes[0].dtype == torch.int64
    assert masks[0].dtype == torch.float32 and masks[0].shape == (3, 2, 3)
    assert masks[0][2].tolist() == [[1, 1, 0], [0, 1, 0]]  # class 3; the ignored pixel is in no mask
    assert masks[0].sum(0).tolist() == [[1, 1, 0], [1, 1, 1]]
    assert masks[1].shape == (0, 2, 3) and classes[1].numel() == 0  # nothing labelled: no target
    model = build_model(resolve_config({"model": tiny_folder}), {i: str(i) for i in range(4)})
    outputs = model(pixel_values=torch.randn(2, 3, 64, 64), mask_labels=masks, class_labels=classes)
    assert torch.isfinite(outputs.loss)  # the loss runs with an image without targets
    outputs.loss.backward()


def test_presets_are_the_reference_models_and_get_its_recipe():
    labels = {i: f"c{i}" for i in range(150)}
    for name, reference in (("mask2former-swin-t-offset", 47_570_705), ("mask2former-swin-t", 47_439_633)):
        model = build_model(resolve_config({"model": name}), labels)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable == reference, name  # the reference's count; SwinBackbone's unused final LayerNorm is frozen
        assert model.config.model_type == ("mask2former_offset" if name.endswith("offset") else "mask2former")
    _, data, args = resolve_config({"model": "mask2former-swin-t-offset", "dataset": "ade20k"})
    assert (args.learning_rate, args.head_lr_mult, args.weight_decay) == (1e-5, 10.0, 0.05)
    assert (args.warmup_steps, args.poly_power, args.max_grad_norm) == (0, 0.9, 0.01)
    assert (args.max_steps, args.global_batch_size, data.crop_size) == (160_000, 16, 512)
    assert resolve_config({"model": "mask2former-swin-t", "learning_rate": 2e-5}).training_args.learning_rate == 2e-5
    assert resolve_config({"model": "offseg-t", "dataset": "ade20k"}).training_args.weight_decay == 0.01
    with pytest.raises(ValueError, match="classifies masks, not pixels"):
        build_model(resolve_config({"model": "mask2former-swin-t-offset", "classifier": "per-pixel"}), labels)


def test_param_groups_and_swin_backbone_weights(tiny_folder, tmp_path):
    from transformers import SwinBackbone, SwinConfig

    folder = tiny_folder
    assert resolve_config({"model": folder, "dataset": "ade20k"}).training_args.weight_decay == 0.05  # read from the folder
    model = build_model(resolve_config({"model": folder}), {i: str(i) for i in range(3)})
    assert model.class_predictor.out_features == 4  # 3 classes + no-object, re-initialised
    groups = {g["name"]: g for g in build_param_groups(model, learning_rate=1e-5, weight_decay=0.05)}
    assert groups["backbone"]["lr"] == pytest.approx(1e-5) and groups["head"]["lr"] == pytest.approx(1e-4)
    names = {key: set(g["param_names"]) for key, g in groups.items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set().union(*names.values()) == trainable
    assert "model.pixel_level_module.encoder.swin.layernorm.weight" not in trainable  # unused by SwinBackbone
    swin = "model.pixel_level_module.encoder.swin.encoder.layers.0.blocks.0."
    assert f"{swin}mlp.fc1.weight" in names["backbone"]
    assert {f"{swin}attention.relative_position_bias.relative_position_bias_table",
            f"{swin}layernorm_before.weight"} <= names["backbone_no_decay"]
    assert {"model.transformer_module.queries_embedder.weight", "model.transformer_module.queries_features.weight",
            "model.transformer_module.level_embed.weight",
            "model.transformer_module.decoder.layers.0.final_layer_norm.weight"} <= names["head_no_decay"]
    assert {"model.pixel_level_module.decoder.level_embed", "class_predictor.weight",
            "model.transformer_module.decoder.mask_predictor.offset_learning.class_offset_proj.weight"} <= names["head"]

    torch.manual_seed(3)
    imagenet = SwinBackbone(tiny_config().backbone_config)
    imagenet.save_pretrained(tmp_path / "swin")
    started = build_model(resolve_config({"model": folder, "backbone_weights": str(tmp_path / "swin")}), {0: "a", 1: "b"})
    encoder = started.model.pixel_level_module.encoder
    for key, value in imagenet.state_dict().items():
        assert torch.equal(encoder.state_dict()[key], value), key
    SwinBackbone(SwinConfig(embed_dim=24, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                            out_features=["stage1", "stage2", "stage3", "stage4"])).save_pretrained(tmp_path / "swin-big")
    with pytest.raises(ValueError, match="--backbone-weights .*swin-big"):
        build_model(resolve_config({"model": folder, "backbone_weights": str(tmp_path / "swin-big")}), {0: "a", 1: "b"})


def _train(output_dir: Path, model: str, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "offseg_hf", "train", "--model", model, "--dataset", "synthetic",
        "--output-dir", str(output_dir), "--max-steps", "4", "--save-steps", "2", "--eval-steps", "2",
        "--global-batch-size", "2", "--num-labels", "4", "--image-size", "64", "--crop-size", "64",
        "--train-scale", "64", "64", "--train-samples", "8", "--eval-samples", "2", "--eval-batch-size", "2",
        "--logging-steps", "1", "--num-workers", "0", "--use-cpu", *extra,
    ]
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_train_resume_evaluate_predict(tmp_path):
    from offseg_hf.models import Mask2FormerOffsetForUniversalSegmentation

    start = tmp_path / "tiny"
    torch.manual_seed(0)
    Mask2FormerOffsetForUniversalSegmentation(tiny_config(num_labels=4)).save_pretrained(start)
    reference = tmp_path / "reference"
    result = _train(reference, str(start))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "missing keys" not in result.stderr and "unexpected keys" not in result.stderr  # checkpoints reload whole
    config = json.loads((reference / "config.json").read_text())
    assert config["model_type"] == "mask2former_offset" and len(config["id2label"]) == 4
    processor = json.loads((reference / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "Mask2FormerSemanticImageProcessor" and processor["do_pad"]
    losses = _losses(reference)
    assert sorted(losses) == [1, 2, 3, 4] and all(value > 0 for value in losses.values())
    metrics = json.loads((reference / "eval_results.json").read_text())
    assert 0.0 <= metrics["eval_mIoU"] <= 1.0

    # interrupted after step 2: resume continues with the same losses
    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    result = _train(resumed, str(start), "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {resumed / 'checkpoint-2'}" in result.stderr
    expected, got = _losses(reference), _losses(resumed)
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), step
    saved = {k: v for k, v in _safetensors(resumed).items()}
    for key, value in _safetensors(reference).items():
        assert torch.allclose(saved[key], value, atol=1e-5), key

    env = evaluate_agrees_with_the_trainer(resumed)  # the same images and the same reference predict
    predict = subprocess.run(
        [sys.executable, "-m", "offseg_hf", "predict", str(resumed / "samples" / "val_000.png"), "--model",
         str(resumed), "--out", str(tmp_path / "predictions"), "--device", "cpu", "--quiet"], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=600,
    )
    assert predict.returncode == 0, predict.stderr[-3000:]
    assert (tmp_path / "predictions" / "val_000_labels.png").is_file()


@pytest.mark.slow
def test_two_cpu_processes(tiny_folder, tmp_path):
    """torchrun with two CPU processes (gloo): DDP finds a gradient for every trainable parameter (SwinBackbone's unused
    LayerNorm is frozen), and the distributed evaluation equals `offseg evaluate`'s of the saved model."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    output = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "offseg_hf", "train", "--model", tiny_folder, "--dataset", "synthetic", "--output-dir",
               str(output), "--max-steps", "2", "--save-steps", "2", "--eval-steps", "2", "--global-batch-size", "4",
               "--num-labels", "4", "--image-size", "64", "--crop-size", "64", "--train-scale", "64", "64",
               "--train-samples", "8", "--eval-samples", "3", "--eval-batch-size", "1", "--num-workers", "0", "--use-cpu"]
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    info = json.loads((output / "run_info.json").read_text())
    assert (info["world_size"], info["per_device_train_batch_size"], info["global_batch_size"]) == (2, 2, 4), info
    assert "BatchNorm" not in result.stderr  # nothing to synchronise: no BatchNorm in Mask2Former

    from offseg_hf.data.loading import load_segmentation_dataset
    from offseg_hf.evaluation.evaluate import evaluate_model, protocol_for
    from offseg_hf.inference.predict import load_model

    model, processor = load_model(str(output), device="cpu")
    data = load_segmentation_dataset("synthetic", "validation", num_labels=4, num_samples=3, image_size=64, seed=0)
    single = evaluate_model(model, processor, data, 4, protocol=protocol_for("synthetic", 64), progress=False)
    final = json.loads((output / "eval_results.json").read_text())
    assert single["num_images"] == 3 and single["mIoU"] == pytest.approx(final["eval_mIoU"], abs=1e-6)


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")
