"""Training recipe: parameter groups, LR schedule, config merging, and short end-to-end runs.

The end-to-end runs use a tiny OffSeg (one block per stage, 32-wide decoder) on 32×32 synthetic
scenes so that each stays within seconds of compute on a 2-core CPU.
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from offseg_hf import EfficientFormerV2Config, OffSegConfig, OffSegForSemanticSegmentation
from offseg_hf.training.train import (
    RECIPES,
    build_model,
    build_param_groups,
    is_head_parameter,
    resolve_config,
    warmup_poly_factor,
)

REPO = Path(__file__).resolve().parents[1]


def tiny_config(num_labels: int = 4) -> OffSegConfig:
    backbone = EfficientFormerV2Config(
        hidden_sizes=[16, 16, 32, 32], depths=[1, 1, 1, 1], num_attention_blocks=[0, 0, 1, 1],
        mlp_expansion_ratios=[[2], [2], [2], [2]], key_dim=8, num_attention_heads=2, downsample_key_dim=8,
        downsample_num_attention_heads=2, out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    return OffSegConfig(backbone_config=backbone, decoder_stage_channels=[16, 16, 16, 16], decoder_hidden_size=32,
                        decoder_num_groups=4, num_labels=num_labels)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    OffSegForSemanticSegmentation(tiny_config()).save_pretrained(path)
    return path


def test_param_groups_of_offseg_t():
    model = OffSegForSemanticSegmentation(OffSegConfig.from_preset("offseg-t", num_labels=5))
    groups = {g["name"]: g for g in build_param_groups(model, learning_rate=6e-5, weight_decay=0.01)}
    assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    assert groups["backbone"]["lr"] == pytest.approx(6e-5) and groups["head"]["lr"] == pytest.approx(6e-4)
    assert groups["head_no_decay"]["lr"] == pytest.approx(6e-4) and groups["backbone_no_decay"]["weight_decay"] == 0
    assert groups["backbone"]["weight_decay"] == 0.01 and groups["head"]["weight_decay"] == 0.01
    names = {key: set(g["param_names"]) for key, g in groups.items()}
    # every parameter exactly once
    total = sum(len(v) for v in names.values())
    assert total == len(list(model.parameters())) == len(set().union(*names.values()))
    # backbone BatchNorm, decoder GroupNorm and the class-score LayerNorm are not decayed
    assert "offseg.backbone.embeddings.conv1.norm.weight" in names["backbone_no_decay"]
    assert "offseg.decoder.stage_projections.0.norm.weight" in names["head_no_decay"]
    assert {"offset_learning.mask_norm.weight", "offset_learning.mask_norm.bias"} <= names["head_no_decay"]
    # convolutions are decayed; class embeddings decayed as in the reference, unless asked otherwise
    assert "offseg.backbone.embeddings.conv1.conv.weight" in names["backbone"]
    assert "offset_learning.class_embeddings" in names["head"]
    # the backbone's talking-head convs stay at the backbone lr (the reference's substring quirk is not copied)
    assert any("talking_head" in n for n in names["backbone"])
    exempt = {g["name"]: set(g["param_names"]) for g in build_param_groups(model, no_decay_class_embeddings=True)}
    assert "offset_learning.class_embeddings" in exempt["head_no_decay"]
    assert not is_head_parameter("offseg.backbone.stages.0.blocks.0.mlp.fc1.conv.weight")


def test_warmup_poly_values():
    f = lambda step: warmup_poly_factor(step, max_steps=160_000, warmup_steps=1500, start_factor=1e-6, power=1.0)
    assert f(0) == pytest.approx(1e-6)
    assert f(750) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert f(1500) == pytest.approx(1.0)
    assert f(1500 + 158_500 // 2) == pytest.approx(0.5)
    assert f(160_000) == 0.0 and f(170_000) == 0.0
    assert warmup_poly_factor(10, max_steps=20, warmup_steps=0, power=2.0) == pytest.approx(0.25)


def test_trainer_learning_rates_at_chosen_steps(tiny_model_dir, tmp_path):
    """The real optimiser + scheduler of the Trainer: group lrs after 0, warm-up/2, warm-up and the end."""
    from offseg_hf.training.train import build_trainer

    config = resolve_config({"dataset": "synthetic", "model": str(tiny_model_dir), "output_dir": str(tmp_path),
                             "max_steps": 20, "warmup_steps": 4, "num_labels": 4, "image_size": 32,
                             "train_samples": 8, "eval_samples": 2, "num_workers": 0, "use_cpu": True})
    trainer, _ = build_trainer(config)
    trainer.create_optimizer_and_scheduler(num_training_steps=20)
    optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
    expected = {0: 1e-6, 2: 1e-6 + (1 - 1e-6) * 0.5, 4: 1.0, 12: 0.5, 20: 0.0}
    for step in range(21):
        if step in expected:
            for group in optimizer.param_groups:
                base = config.training_args.learning_rate * (10 if group["name"].startswith("head") else 1)
                assert group["lr"] == pytest.approx(base * expected[step], rel=1e-6, abs=1e-15), (step, group["name"])
        optimizer.step()
        scheduler.step()


def test_resolve_config_precedence(tmp_path):
    _, data, args = resolve_config({"dataset": "ade"})
    assert data.dataset == "ade20k" and args.max_steps == 160_000 and args.global_batch_size == 16
    assert data.crop_size == 512 and args.warmup_steps == 1500 and args.per_device_eval_batch_size == 1
    assert args.learning_rate == 6e-5 and args.weight_decay == 0.01 and args.head_lr_mult == 10
    assert (args.adam_beta1, args.adam_beta2, args.warmup_start_factor, args.poly_power) == (0.9, 0.999, 1e-6, 1.0)
    assert args.per_device_train_batch_size == 16 and args.world_size == 1  # one process here: the whole batch
    assert resolve_config({"dataset": "synthetic"}).training_args.learning_rate == 6e-4
    city = resolve_config({"dataset": "cityscapes"})
    assert city.training_args.global_batch_size == 8 and city.data_args.crop_size == 1024
    assert resolve_config({"dataset": "pascal-context"}).data_args.crop_size == 480
    assert resolve_config({"dataset": "coco-stuff"}).training_args.max_steps == RECIPES["coco-stuff"]["max_steps"] == 80_000
    file = tmp_path / "run.json"
    file.write_text(json.dumps({"dataset": "ade20k", "max-steps": 100, "learning_rate": 1e-4}))
    merged = resolve_config({"max_steps": 50, "learning_rate": None}, str(file)).training_args
    assert merged.max_steps == 50 and merged.learning_rate == 1e-4
    file.write_text(json.dumps({"max_stepz": 1}))
    with pytest.raises(ValueError, match="max_stepz"):
        resolve_config({}, str(file))


def test_per_pixel_classifier_is_built_from_the_training_config():
    config = resolve_config({"dataset": "synthetic", "model": "offseg-t", "classifier": "per-pixel"}, None)
    model = build_model(config, {index: f"class{index}" for index in range(3)})
    assert model.config.classifier == "per_pixel" and not hasattr(model, "offset_learning")
    assert tuple(model.classifier.weight.shape) == (3, 256, 1, 1)


def _train_command(model_dir: Path, output_dir: Path, max_steps: int, *extra: str) -> list[str]:
    return [
        "--dataset", "synthetic", "--model", str(model_dir), "--output-dir", str(output_dir),
        "--max-steps", str(max_steps), "--global-batch-size", "2", "--num-labels", "4", "--image-size", "32",
        "--crop-size", "32", "--train-scale", "32", "32", "--train-samples", "6", "--eval-samples", "2",
        "--eval-batch-size", "2", "--warmup-steps", "2", "--learning-rate", "1e-3", "--logging-steps", "1",
        "--num-workers", "0", "--use-cpu", *extra,
    ]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    return env


def _losses(output_dir: Path) -> dict[int, float]:
    history = json.loads((output_dir / "log_history.json").read_text())
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.mark.slow
def test_resume_after_kill_continues_identically(tiny_model_dir, tmp_path):
    steps = 6
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "-m", "offseg_hf", "train", *_train_command(tiny_model_dir, reference, steps,
                    "--eval-steps", "3")], cwd=REPO, env=_env(), check=True, capture_output=True)
    # a run killed once its step-3 checkpoint is complete
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "offseg_hf", "train", *_train_command(tiny_model_dir, killed, steps,
                                "--eval-steps", "3")], cwd=REPO, env=_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "checkpoint-3" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.kill()
    process.wait()
    assert state.exists(), "the run never wrote checkpoint-3"
    for later in ("checkpoint-6",):
        if (killed / later).exists():  # killed too late: drop what came after step 3
            import shutil

            shutil.rmtree(killed / later)
    result = subprocess.run([sys.executable, "-m", "offseg_hf", "train", *_train_command(tiny_model_dir, killed, steps,
                             "--eval-steps", "3", "--resume")], cwd=REPO, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {killed / 'checkpoint-3'}" in result.stderr
    # the new process trained steps 4..6 only: it logged three training losses
    printed = result.stdout + result.stderr
    assert printed.count("{'loss':") == 3, printed[-3000:]
    resumed = _losses(killed)
    expected = _losses(reference)
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-4), step
    final = json.loads((killed / "checkpoint-6" / "trainer_state.json").read_text())
    assert final["global_step"] == 6


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_train_with_the_requested_global_batch(tiny_model_dir, tmp_path):
    """The launch the README documents: torchrun, two CPU processes (gloo). The run records the world size and
    per-device batch it used (run_info.json, trainer_state.json): 2 × 2 = the requested global batch of 4; only
    the main process prints its messages and the result."""
    output = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "offseg_hf", "train",
               *_train_command(tiny_model_dir, output, 3, "--eval-steps", "3", "--eval-samples", "3",
                               "--global-batch-size", "4")]
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    info = json.loads((output / "run_info.json").read_text())
    assert (info["world_size"], info["per_device_train_batch_size"], info["global_batch_size"]) == (2, 2, 4), info
    assert info["distributed_type"].endswith("MULTI_CPU") and info["device"].startswith("cpu")
    metrics = json.loads((output / "eval_results.json").read_text())
    assert 0.0 <= metrics["eval_mIoU"] <= 1.0 and math.isfinite(metrics["eval_loss"])
    state = json.loads((output / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["train_batch_size"] == 2  # what the Trainer itself recorded
    assert json.loads((output / "train_config.json").read_text())["global_batch_size"] == 4
    # only the main process talks: one warning that BatchNorm stays per process (SyncBatchNorm needs an
    # accelerator), one result line
    assert result.stderr.count("keeping per-process BatchNorm") == 1, result.stderr[-4000:]
    assert result.stdout.count("final mIoU") == 1, result.stdout[-4000:]
    # the distributed evaluation (3 images over 2 processes, batches of 2: padded, gathered, truncated)
    # equals a single-process evaluation of the saved model
    from offseg_hf.data.loading import load_segmentation_dataset
    from offseg_hf.evaluation.evaluate import evaluate_model, protocol_for
    from transformers import AutoImageProcessor

    model = OffSegForSemanticSegmentation.from_pretrained(output).eval()
    data = load_segmentation_dataset("synthetic", "validation", num_labels=4, num_samples=3, image_size=32, seed=0)
    single = evaluate_model(model, AutoImageProcessor.from_pretrained(output), data, 4,
                            protocol=protocol_for("synthetic", 32), progress=False)
    assert single["num_images"] == 3
    assert metrics["eval_mIoU"] == pytest.approx(single["mIoU"], abs=1e-6)
    assert metrics["eval_aAcc"] == pytest.approx(single["aAcc"], abs=1e-6)


# ----------------------------------------------------------------------------------------------
# Arguments: dataclasses parsed by HfArgumentParser (flags, JSON / YAML files), the recipe's defaults
# ----------------------------------------------------------------------------------------------

YAML_RUN = """\
dataset: ade20k
model: offseg-b
classifier: per-pixel
max-steps: 100
learning_rate: 1e-4        # YAML reads this as a string; it is coerced to the field's type
warmup_steps: 10
train_scale: [1024, 256]
photometric: false
use_cpu: true
lr_scheduler_type: cosine
head_lr_mult: 5
eval_batch_size: 2         # the option's earlier name (per_device_eval_batch_size)
save_steps: 50
eval_steps: 25
resume: true
seed: 3
dataloader_num_workers: 0
"""

FLAGS_RUN = ["--dataset", "ade20k", "--model", "offseg-b", "--classifier", "per-pixel", "--max-steps", "100",
             "--learning-rate", "1e-4", "--warmup-steps", "10", "--train-scale", "1024", "256", "--no-photometric",
             "--use-cpu", "--lr-scheduler-type", "cosine", "--head-lr-mult", "5", "--eval-batch-size", "2",
             "--save-steps", "50", "--eval_steps", "25", "--resume", "--seed", "3", "--num-workers", "0"]


def test_yaml_config_and_equivalent_flags_give_identical_training_arguments(tmp_path):
    from offseg_hf.training.train import OffSegTrainingArguments, parse_train_argv

    file = tmp_path / "run.yaml"
    file.write_text(YAML_RUN)
    from_file = resolve_config({}, str(file))
    given, config_file = parse_train_argv(FLAGS_RUN)
    assert config_file is None and "max_steps" in given and "weight_decay" not in given  # only what was typed
    from_flags = resolve_config(given)
    assert isinstance(from_flags.training_args, OffSegTrainingArguments)
    assert from_flags.training_args.to_dict() == from_file.training_args.to_dict()
    assert from_flags.to_dict() == from_file.to_dict()
    model_args, data, args = from_flags
    # the values given, not the recipe's (so the comparison above can fail)
    assert (model_args.model, model_args.classifier, data.dataset, data.train_scale, data.photometric) == (
        "offseg-b", "per-pixel", "ade20k", [1024, 256], False)
    assert (args.max_steps, args.learning_rate, args.warmup_steps, args.lr_scheduler_type.value) == (100, 1e-4, 10, "cosine")
    assert (args.head_lr_mult, args.per_device_eval_batch_size, args.save_steps, args.eval_steps) == (5, 2, 50, 25)
    assert args.resume and args.seed == args.data_seed == 3 and args.use_cpu and args.dataloader_num_workers == 0
    assert args.global_batch_size == args.per_device_train_batch_size == 16  # the ADE20K recipe, one process
    # a flag wins over the file; the file's other values stay
    given, config_file = parse_train_argv(["--config", str(file), "--max_steps", "7", "--save-steps", "7",
                                           "--eval-steps", "7"])
    both = resolve_config(given, config_file).training_args
    assert (both.max_steps, both.learning_rate, both.head_lr_mult) == (7, 1e-4, 5)
    # the JSON written next to a run is a config file that reproduces its arguments
    (tmp_path / "train_config.json").write_text(from_file.to_json())
    again = resolve_config({}, str(tmp_path / "train_config.json"))
    assert again.to_dict() == from_file.to_dict()


def test_earlier_option_names_in_config_files_keep_working(tmp_path):
    file = tmp_path / "old.json"
    file.write_text(json.dumps({"dataset": "synthetic", "eval_batch_size": 4, "num_workers": 0, "per_device_batch_size": 2,
                                "global_batch_size": 2, "push_to_hub": "me/offseg-run", "hub_private": True,
                                "mixed_precision": "no", "extra": {"max_grad_norm": 0.5}, "hub_id": None}))
    _, _, args = resolve_config({}, str(file))
    assert (args.per_device_eval_batch_size, args.dataloader_num_workers, args.per_device_train_batch_size) == (4, 0, 2)
    assert args.push_to_hub and args.hub_model_id == "me/offseg-run" and args.hub_private_repo
    assert args.max_grad_norm == 0.5 and not args.bf16 and not args.fp16
    file.write_text(json.dumps({"mixed_precision": "fp8"}))
    with pytest.raises(ValueError, match="mixed_precision must be no, bf16 or fp16"):
        resolve_config({}, str(file))
    # the train_config.json offseg-hf 0.1 wrote (TrainConfig.to_json) still configures the same run
    old = json.loads((REPO / "tests" / "fixtures" / "train_config_offseg_hf_0.1.json").read_text())
    _, data, args = resolve_config({}, str(REPO / "tests" / "fixtures" / "train_config_offseg_hf_0.1.json"))
    assert (data.dataset, data.crop_size, data.train_scale, args.max_steps, args.eval_steps) == ("synthetic", 64, [64, 64], 40, 20)
    assert (args.learning_rate, args.warmup_steps, args.global_batch_size, args.per_device_eval_batch_size) == (
        old["learning_rate"], old["warmup_steps"], old["global_batch_size"], old["eval_batch_size"])
    assert args.max_grad_norm == 0.5 and args.use_cpu and args.dataloader_num_workers == 0 and not args.resume
    with pytest.raises(ValueError, match="is not --global-batch-size 8; give one of them"):
        resolve_config({"per_device_train_batch_size": 2, "global_batch_size": 8})


def test_train_help_lists_every_field_with_its_default():
    """``offseg train --help`` (read from train_options.json, without transformers) shows every field of the three
    argument dataclasses with its default, and that file is what the dataclasses generate today."""
    import dataclasses

    from offseg_hf.cli import build_parser
    from offseg_hf.cli.train import SPEC
    from offseg_hf.training.train import DataArguments, ModelArguments, OffSegTrainingArguments, cli_spec

    assert json.loads(SPEC.read_text()) == cli_spec(), (
        "offseg_hf/cli/train_options.json is out of date: run "
        "python -c 'from offseg_hf.training.train import write_cli_spec; write_cli_spec()'")
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    train = subparsers.choices["train"]
    text = " ".join(train.format_help().split())
    shown = {action.dest: action for action in train._actions if action.option_strings}
    for cls in (ModelArguments, DataArguments, OffSegTrainingArguments):
        for f in dataclasses.fields(cls):
            if not f.init or f.name == "debug":  # --debug is the CLI's (tracebacks); a config file can set it
                continue
            assert f.name in shown, f"offseg train has no option for {cls.__name__}.{f.name}"
            assert "(default:" in shown[f.name].help, f"--{f.name}: no default in its help"
            assert f"--{f.name}" in text
    assert "--head_lr_mult HEAD_LR_MULT, --head-lr-mult HEAD_LR_MULT head learning-rate multiplier (default: 10)" in text
    assert "--seed SEED seed of the initial weights, data order and augmentations (default: 0)" in text


def test_transformers_polynomial_schedule_does_not_reproduce_the_warm_up():
    """Why the recipe keeps one schedule function: transformers' polynomial schedule decays identically but warms
    up from 0, the recipe (mmseg's warmup_ratio) from 1e-6."""
    from transformers import get_polynomial_decay_schedule_with_warmup

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=6e-5)
    theirs = get_polynomial_decay_schedule_with_warmup(optimizer, 1500, 160_000, lr_end=0.0, power=1.0).lr_lambdas[0]
    ours = lambda step: warmup_poly_factor(step, 160_000, 1500, 1e-6, 1.0)
    for step in (1500, 1501, 80_000, 159_999, 160_000):
        assert theirs(step) == pytest.approx(ours(step), rel=1e-12, abs=0)
    assert theirs(0) == 0.0 and ours(0) == 1e-6
    assert ours(750) - theirs(750) == pytest.approx(5e-7, rel=1e-6)


def test_an_explicit_transformers_schedule_replaces_the_recipe_one(tiny_model_dir, tmp_path):
    from offseg_hf.training.train import build_trainer

    config = resolve_config({"dataset": "synthetic", "model": str(tiny_model_dir), "output_dir": str(tmp_path),
                             "max_steps": 20, "warmup_steps": 4, "num_labels": 4, "image_size": 32,
                             "train_samples": 8, "eval_samples": 2, "num_workers": 0, "use_cpu": True,
                             "lr_scheduler_type": "constant"})
    trainer, _ = build_trainer(config)
    trainer.create_optimizer_and_scheduler(num_training_steps=20)
    for _ in range(10):
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(6e-4)


def _tiny_folder(name: str, path: Path) -> Path:
    from offseg_hf import SegformerOffsetForSemanticSegmentation, SegNextForSemanticSegmentation
    from test_modeling_common import tiny_segformer_offset_config
    from test_modeling_segnext import tiny_config as tiny_segnext_config

    torch.manual_seed(0)
    build = {"offseg": lambda: OffSegForSemanticSegmentation(tiny_config()),
             "segformer_offset": lambda: SegformerOffsetForSemanticSegmentation(
                 tiny_segformer_offset_config(num_labels=4, decoder_hidden_size=32, decoder_num_groups=4)),
             "segnext": lambda: SegNextForSemanticSegmentation(tiny_segnext_config(num_labels=4))}[name]
    build().save_pretrained(path)
    return path


def _mixed_precision_config(folder: Path, output_dir: Path, precision: str):
    return resolve_config({"dataset": "synthetic", "model": str(folder), "output_dir": str(output_dir), "max_steps": 3,
                           "warmup_steps": 0, "num_labels": 4, "image_size": 32, "train_samples": 6, "eval_samples": 2,
                           "num_workers": 0, "use_cpu": True, precision: True, "per_device_train_batch_size": 2,
                           "global_batch_size": 2, "save_strategy": "no", "eval_strategy": "no", "report_to": "none"})


@pytest.mark.parametrize("name", ["offseg", "segformer_offset", "segnext"])
def test_trainer_bf16_runs_the_model_under_autocast(name, tmp_path):
    """The recipe's ``--bf16`` through the real Trainer (accelerate's autocast): the forward runs in bfloat16, the
    loss is finite and float32, the weights stay float32. (``--fp16`` takes the same path on GPUs, with the
    gradient scaler; the autocast step itself is tested on CPU in test_precision.py.)"""
    from offseg_hf.training.train import build_trainer

    precision = "bf16"
    trainer, _ = build_trainer(_mixed_precision_config(_tiny_folder(name, tmp_path / "model"), tmp_path / "run", precision))
    assert trainer.accelerator.native_amp and trainer.accelerator.mixed_precision == precision
    seen, losses = [], []
    convolution = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
    convolution.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    trainer.model.register_forward_hook(lambda module, args, output: losses.append(output.loss))
    result = trainer.train()
    assert seen and all(dtype == torch.bfloat16 for dtype in seen)  # (the outputs are cast back to float32 by accelerate)
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses)
    assert result.global_step == 3 and math.isfinite(result.training_loss)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_fp16_where_accelerate_cannot_autocast_is_refused(tiny_model_dir, tmp_path):
    """On a CPU accelerate has no float16 autocast and would train in float32 without a word: refused, naming the fix."""
    from offseg_hf.training.train import build_trainer

    with pytest.raises(ValueError, match="--fp16 mixed precision is not available on this device.*use --bf16"):
        build_trainer(_mixed_precision_config(tiny_model_dir, tmp_path / "run", "fp16"))
