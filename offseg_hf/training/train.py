"""The paper's training recipe on the Hugging Face ``Trainer`` (single process, or ``accelerate launch``).

Recipe (OffSeg's configs, which follow SegFormer's), every value overridable:

* AdamW, learning rate 6e-5, betas (0.9, 0.999), weight decay 0.01;
* the head (decoder + offset learning) at 10× the learning rate of the backbone;
* no weight decay on normalisation layers (BatchNorm in the backbone, GroupNorm in the decoder,
  the LayerNorm over classes in offset learning) — what the reference's ``custom_keys={"norm": decay 0}``
  intends. The class embeddings W keep weight decay, as in the reference (its custom keys do not
  exempt them): W plays the role of the 1×1 classifier weight it replaces, which is decayed too,
  and the paper's numbers were obtained that way; ``no_decay_class_embeddings=True`` exempts them;
* linear warm-up over 1,500 iterations from factor 1e-6, then poly decay (power 1.0) to 0
  (:func:`warmup_poly_factor`);
* iterations and global batch per dataset (:data:`RECIPES`): 160k for ADE20K / Cityscapes, 80k for
  COCO-Stuff / Pascal Context, batch 16 (8 for Cityscapes); crop 512 (1024 Cityscapes, 480 Pascal Context).

One deliberate deviation: the reference matches custom keys as substrings of parameter names, so
its ``"head"`` key also gives 10× to EfficientFormerV2's ``talking_head`` convolutions inside the
backbone. We apply the multiplier to the decode head only, by module, which is what the key means.

Entry points: :func:`resolve_config` (recipe ← config file ← command line), :func:`build_trainer`,
:func:`train`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from offseg_hf.data.registry import DATASETS, get_dataset
from offseg_hf.training.checkpoints import STAGING_DIR, atomic_write_text, newest_complete_checkpoint, publish_folder

logger = logging.getLogger(__name__)

__all__ = [
    "RECIPES",
    "TrainConfig",
    "build_param_groups",
    "build_trainer",
    "is_head_parameter",
    "resolve_config",
    "TrainingInterrupted",
    "train",
    "warmup_poly_factor",
]

# Per dataset: the reference schedule, batch, crop and resize scales (each dataset's spec in the registry).
RECIPES: dict[str, dict[str, Any]] = {name: spec.training_defaults() for name, spec in DATASETS.items()}


@dataclass
class TrainConfig:
    """Everything a training run needs. ``None`` fields are filled from :data:`RECIPES` by dataset.

    Data: ``dataset``, ``data_dir`` or ``hub_id`` (+ ``image_column``, ``label_column``,
    ``label_format``, ``hub_revision``); synthetic only: ``num_labels``, ``train_samples``,
    ``eval_samples``, ``image_size``. ``eval_max_samples`` evaluates on the first N validation images.
    """

    dataset: str = "synthetic"
    output_dir: str = "outputs/offseg"
    model: str = "offseg-t"
    data_dir: str | None = None
    hub_id: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    label_format: str | None = None
    hub_revision: str | None = None
    backbone_weights: str | None = None
    # schedule
    max_steps: int | None = None
    global_batch_size: int | None = None
    per_device_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    learning_rate: float | None = None  # 6e-5 (the paper); the synthetic recipe uses 6e-4 (random init, short run)
    head_lr_mult: float = 10.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_steps: int | None = None
    warmup_start_factor: float = 1e-6
    poly_power: float = 1.0
    no_decay_class_embeddings: bool = False
    classifier: str = "offset-learning"  # or "per-pixel": a 1×1 conv in place of offset learning (Table 6)
    time_budget_s: float | None = None  # stop training after this much wall time (benchmarks)
    # data pipeline
    crop_size: int | None = None
    train_scale: tuple[int, int] | None = None
    test_scale: tuple[int, int] | None = None
    cat_max_ratio: float = 0.75
    photometric: bool = True
    eval_batch_size: int | None = None
    eval_max_samples: int | None = None
    num_workers: int = 2
    num_labels: int = 8
    train_samples: int = 2000
    eval_samples: int = 100
    image_size: int = 64
    # bookkeeping
    eval_steps: int | None = None
    save_steps: int | None = None
    save_total_limit: int = 2
    logging_steps: int | None = None
    seed: int = 0
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16"
    resume: bool = False
    push_to_hub: str | None = None
    hub_private: bool = False
    report_to: str = "none"
    use_cpu: bool = False
    quiet: bool = False  # no progress bar, no per-step log lines
    skip_bad_samples: bool = False  # train on the samples that pass the dataset check (count logged)
    extra: dict[str, Any] = field(default_factory=dict)  # passed to TrainingArguments as is

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def _load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON or YAML mapping of :class:`TrainConfig` fields (dashes allowed in keys)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of training options, got {type(data).__name__}")
    return {key.replace("-", "_"): value for key, value in data.items()}


def resolve_config(overrides: dict[str, Any] | None = None, config_file: str | None = None) -> TrainConfig:
    """Recipe defaults ← config file ← ``overrides`` (``None`` values in ``overrides`` are skipped).

    Raises:
        ValueError: an unknown option (named, with the file it came from).
    """
    names = {f.name for f in fields(TrainConfig)}
    merged: dict[str, Any] = {}
    sources: list[tuple[str, dict[str, Any]]] = []
    if config_file:
        sources.append((str(config_file), _load_config_file(config_file)))
    sources.append(("command line", {k: v for k, v in (overrides or {}).items() if v is not None}))
    for source, values in sources:
        for key, value in values.items():
            if key not in names:
                raise ValueError(f"{source}: unknown training option {key!r}")
            merged[key] = value
    config = TrainConfig(**merged)
    dataset = _canonical_dataset(config.dataset)
    config.dataset = dataset
    for key, value in RECIPES[dataset].items():
        if getattr(config, key, None) is None:
            setattr(config, key, value)
    if config.learning_rate is None:
        config.learning_rate = 6e-5
    if config.warmup_steps is None:
        config.warmup_steps = 1500
    if config.eval_steps is None:
        config.eval_steps = max(1, min(16_000, config.max_steps // 10))
    if "save_steps" in merged and "eval_steps" not in merged and config.save_steps % config.eval_steps:
        # only evaluated checkpoints can be the best model: with checkpoints every N steps, evaluate every N
        config.eval_steps = config.save_steps
    if config.save_steps is None:
        config.save_steps = config.eval_steps
    if config.save_steps % config.eval_steps:
        raise ValueError(
            f"save_steps {config.save_steps} is not a multiple of eval_steps {config.eval_steps}: the best "
            "model (kept at the end of training) can only be chosen among evaluated checkpoints; "
            f"use e.g. --save-steps {config.eval_steps * max(1, round(config.save_steps / config.eval_steps))}"
        )
    if config.logging_steps is None:
        config.logging_steps = 50
    for key in ("train_scale", "test_scale"):
        if getattr(config, key) is not None:
            setattr(config, key, tuple(getattr(config, key)))
    _check_model_name(config.model)
    if config.classifier not in ("offset-learning", "per-pixel"):
        raise ValueError(f"classifier must be offset-learning or per-pixel, got {config.classifier!r}")
    if config.mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {config.mixed_precision!r}")
    return config


def _check_model_name(name: str) -> None:
    """``name`` is a preset, an existing folder or a Hub id ``user/name``; anything else fails here, before any
    Hub request, with the valid choices."""
    from offseg_hf.models.configuration_offseg import OFFSEG_PRESETS
    from offseg_hf.models.configuration_segnext import SEGNEXT_PRESETS
    from offseg_hf.inference.predict import HUB_ID

    presets = sorted(OFFSEG_PRESETS) + sorted(SEGNEXT_PRESETS) + sorted(f"{key}-offset" for key in SEGNEXT_PRESETS)
    if name.lower() in presets:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {name}: the folder has no config.json (not a saved model folder)")
        return
    if path.exists():
        raise ValueError(f"--model {name} is a file; give a preset, a model folder or a Hub id")
    if HUB_ID.match(name) and not name.startswith("."):
        return
    raise ValueError(
        f"unknown model {name!r}: choose a preset ({', '.join(presets)}), an existing model folder, "
        "or a Hub id of the form user/name"
    )


def _canonical_dataset(name: str) -> str:
    return get_dataset(name).name


# ----------------------------------------------------------------------------------------------
# Optimiser: parameter groups and schedule
# ----------------------------------------------------------------------------------------------

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def is_head_parameter(name: str) -> bool:
    """``True`` for decoder / offset-learning parameters, ``False`` for the backbone's.

    The backbone is every parameter under a module named ``backbone`` (``offseg.backbone.*``, SegNeXt's
    ``backbone.*``); SegNeXt's ``decode_head``, ``offset_learning`` and ``classifier`` are the head.
    """
    return "backbone" not in name.split(".")


def build_param_groups(
    model: nn.Module,
    learning_rate: float = 6e-5,
    weight_decay: float = 0.01,
    head_lr_mult: float = 10.0,
    no_decay_class_embeddings: bool = False,
) -> list[dict[str, Any]]:
    """AdamW parameter groups of the recipe.

    Four groups (empty ones dropped): ``backbone`` / ``backbone_no_decay`` at ``learning_rate`` and
    ``head`` / ``head_no_decay`` at ``learning_rate * head_lr_mult``; ``*_no_decay`` hold the
    parameters of normalisation layers (BatchNorm, SyncBatchNorm, GroupNorm, LayerNorm) with weight
    decay 0 — and the class embeddings when ``no_decay_class_embeddings``. Each group carries its
    ``name`` and ``param_names`` for inspection.
    """
    norm_params: set[int] = set()
    for module in model.modules():
        if isinstance(module, _NORM_TYPES):
            norm_params.update(id(p) for p in module.parameters(recurse=False))
    groups: dict[str, dict[str, Any]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        part = "head" if is_head_parameter(name) else "backbone"
        no_decay = id(parameter) in norm_params or (no_decay_class_embeddings and name.endswith("class_embeddings"))
        key = f"{part}_no_decay" if no_decay else part
        if key not in groups:
            groups[key] = {
                "name": key,
                "params": [],
                "param_names": [],
                "lr": learning_rate * (head_lr_mult if part == "head" else 1.0),
                "weight_decay": 0.0 if no_decay else weight_decay,
            }
        groups[key]["params"].append(parameter)
        groups[key]["param_names"].append(name)
    order = ["backbone", "backbone_no_decay", "head", "head_no_decay"]
    return [groups[key] for key in order if key in groups]


def warmup_poly_factor(
    step: int, max_steps: int, warmup_steps: int = 1500, start_factor: float = 1e-6, power: float = 1.0
) -> float:
    """Learning-rate factor after ``step`` optimiser steps.

    ``start + (1 - start) * step / warmup`` during warm-up, then
    ``(1 - (step - warmup) / (max_steps - warmup)) ** power``: 1 at the end of warm-up, 0 at ``max_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, max(0, step - warmup_steps) / decay_steps)
    return (1.0 - progress) ** power


# ----------------------------------------------------------------------------------------------
# Trainer wiring
# ----------------------------------------------------------------------------------------------


def _trainer_classes():
    """The Trainer subclass and callback, defined lazily so importing this module stays light."""
    from functools import partial

    from transformers import Trainer, TrainerCallback

    class EpochForAugmentation(TrainerCallback):
        """Tells the seeded train transform which epoch starts, so augmentations depend on (epoch, index)."""

        def __init__(self, example_transform):
            self.example_transform = example_transform

        def on_epoch_begin(self, args, state, control, **kwargs):
            self.example_transform.epoch = int(math.floor(state.epoch + 1e-9)) if state.epoch else 0

    class TimeBudget(TrainerCallback):
        """Stops training (with a final save and evaluation) once ``seconds`` of wall time have passed."""

        def __init__(self, seconds: float):
            import time

            self.seconds, self.clock, self.start = seconds, time.monotonic, None

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = self.clock()

        def on_step_end(self, args, state, control, **kwargs):
            if self.start is not None and self.clock() - self.start > self.seconds:
                control.should_training_stop = True
                control.should_save = True
                control.should_evaluate = True
            return control

    class StopOnInterrupt(TrainerCallback):
        """Ctrl-C (SIGINT) or SIGTERM: finish the current step, save a checkpoint, stop training.

        A second Ctrl-C while that happens interrupts at once (Python's default behaviour).
        """

        def __init__(self):
            self.signal_name: str | None = None
            self.previous: dict = {}

        def _handle(self, signum, frame):
            import signal

            self.signal_name = signal.Signals(signum).name
            signal.signal(signal.SIGINT, signal.default_int_handler)
            logger.warning("%s received: stopping after the current step and saving a checkpoint", self.signal_name)

        def on_train_begin(self, args, state, control, **kwargs):
            import signal
            import threading

            if threading.current_thread() is threading.main_thread():
                for signum in (signal.SIGINT, signal.SIGTERM):
                    self.previous[signum] = signal.signal(signum, self._handle)

        def on_step_end(self, args, state, control, **kwargs):
            if self.signal_name is not None:
                control.should_training_stop = True
                control.should_save = True
            return control

        def on_train_end(self, args, state, control, **kwargs):
            import signal

            for signum, handler in self.previous.items():
                signal.signal(signum, handler)
            self.previous = {}

    class OffSegTrainer(Trainer):
        """``Trainer`` with the recipe's parameter groups and warm-up + poly schedule, and crash-safe
        checkpoints: ``checkpoint-N`` is written under ``output_dir/.incomplete/`` and renamed into
        ``output_dir`` after its last file (:mod:`offseg_hf.training.checkpoints`), so a folder named
        ``checkpoint-N`` is always complete.

        Under several processes, evaluation label maps are padded to a common size (``-100``) before
        the Trainer gathers them, which otherwise only pads dimension 1.
        """

        def __init__(self, *args, recipe: TrainConfig, **kwargs):
            self.recipe = recipe
            self._staging = False
            super().__init__(*args, **kwargs)

        def _get_output_dir(self, trial):
            run_dir = super()._get_output_dir(trial)
            return os.path.join(run_dir, STAGING_DIR) if self._staging else run_dir

        def _save_checkpoint(self, model, trial):
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

            run_dir = self._get_output_dir(trial)
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            staged, final = os.path.join(run_dir, STAGING_DIR, name), os.path.join(run_dir, name)
            if self.args.should_save:
                shutil.rmtree(staged, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            self._staging = True
            try:
                super()._save_checkpoint(model, trial)  # writes into `staged`; rotates nothing there
            finally:
                self._staging = False
            if self.state.best_model_checkpoint == staged:  # this step is the best: record its final name
                self.state.best_model_checkpoint = final
                if self.args.should_save:
                    self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
            self.accelerator.wait_for_everyone()  # every process wrote its RNG state
            if self.args.should_save:
                publish_folder(staged, final)
                rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
            self.accelerator.wait_for_everyone()

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                groups = build_param_groups(
                    model if model is not None else self.model,
                    self.args.learning_rate,
                    self.args.weight_decay,
                    self.recipe.head_lr_mult,
                    self.recipe.no_decay_class_embeddings,
                )
                for group in groups:
                    group.pop("param_names")
                self.optimizer = torch.optim.AdamW(
                    groups, lr=self.args.learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2),
                    eps=self.args.adam_epsilon,
                )
            return self.optimizer

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.lr_scheduler is None:
                factor = partial(
                    warmup_poly_factor,
                    max_steps=num_training_steps,
                    warmup_steps=self.recipe.warmup_steps,
                    start_factor=self.recipe.warmup_start_factor,
                    power=self.recipe.poly_power,
                )
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
                self._created_lr_scheduler = True
            return self.lr_scheduler

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            if labels is not None and self.accelerator.num_processes > 1:
                from offseg_hf.evaluation.metrics import LABEL_PAD_VALUE

                labels = self.accelerator.pad_across_processes(labels, dim=2, pad_index=LABEL_PAD_VALUE)
            return loss, logits, labels

    return OffSegTrainer, EpochForAugmentation, TimeBudget, StopOnInterrupt


def _num_processes(use_cpu: bool = False) -> int:
    """World size of this run. ``cpu=True`` for CPU runs: without it accelerate reports one process under
    ``torchrun``/``accelerate launch`` on CPU (and caches that answer)."""
    from accelerate import PartialState

    return PartialState(cpu=use_cpu or not torch.cuda.is_available()).num_processes


def build_model(config: TrainConfig, id2label: dict[int, str]):
    """A fresh model from a preset or one loaded from a folder / Hub id.

    Presets: ``offseg-t``/``-b``/``-l``, and SegNeXt ``segnext-t``/``-s``/``-b``/``-l`` (per-pixel classifier) or
    ``segnext-t-offset`` … (offset learning; for SegNeXt the preset name chooses the classifier). A loaded
    model with a different number of classes gets a new classifier (``ignore_mismatched_sizes``).
    ``backbone_weights`` (a folder or Hub id of ``EfficientFormerV2Backbone`` weights for OffSeg, of
    ``MscanBackbone`` weights for SegNeXt) initialises the backbone.
    """
    from transformers import AutoConfig

    from offseg_hf import OffSegConfig, OffSegForSemanticSegmentation, SegNextConfig, SegNextForSemanticSegmentation
    from offseg_hf.models.configuration_offseg import OFFSEG_PRESETS
    from offseg_hf.models.configuration_segnext import SEGNEXT_PRESETS

    label2id = {name: index for index, name in id2label.items()}
    labels = {"num_labels": len(id2label), "id2label": id2label, "label2id": label2id}
    classifier = config.classifier.replace("-", "_")  # the config field's spelling: offset_learning / per_pixel
    name = config.model.lower()
    if name in OFFSEG_PRESETS:
        model = OffSegForSemanticSegmentation(OffSegConfig.from_preset(config.model, classifier=classifier, **labels))
    elif name.removesuffix("-offset") in SEGNEXT_PRESETS:
        if name.endswith("-offset") and config.classifier == "per-pixel":
            raise ValueError(f"--model {config.model} is SegNeXt with offset learning; use {name.removesuffix('-offset')} "
                             "for the per-pixel classifier")
        model = SegNextForSemanticSegmentation(SegNextConfig.from_preset(config.model, **labels))
    elif AutoConfig.from_pretrained(config.model).model_type == SegNextConfig.model_type:
        model = SegNextForSemanticSegmentation.from_pretrained(config.model, ignore_mismatched_sizes=True, **labels)
    else:
        model = OffSegForSemanticSegmentation.from_pretrained(config.model, ignore_mismatched_sizes=True, **labels)
        if model.config.classifier != classifier:
            raise ValueError(
                f"{config.model} uses the {model.config.classifier!r} classifier but --classifier asks for "
                f"{config.classifier!r}; start from a preset (offseg-t/b/l) to train the other variant"
            )
    is_segnext = isinstance(model, SegNextForSemanticSegmentation)
    if config.backbone_weights:
        from offseg_hf import EfficientFormerV2Backbone, MscanBackbone

        backbone_class = MscanBackbone if is_segnext else EfficientFormerV2Backbone
        target = model.backbone if is_segnext else model.offseg.backbone
        backbone = backbone_class.from_pretrained(config.backbone_weights)
        missing, unexpected = target.load_state_dict(backbone.state_dict(), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{config.backbone_weights}: backbone weights do not match (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]})"
            )
    return model


def maybe_sync_batch_norm(model: nn.Module, num_processes: int, device_type: str) -> nn.Module:
    """Convert BatchNorm to SyncBatchNorm when training on several accelerator processes.

    PyTorch's SyncBatchNorm needs an accelerator; on CPU (gloo) the model keeps per-process BatchNorm
    and a warning says so.
    """
    if num_processes <= 1:
        return model
    if device_type == "cpu":
        logger.warning("several CPU processes: SyncBatchNorm needs an accelerator, keeping per-process BatchNorm")
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def load_datasets(config: TrainConfig):
    """Train and validation datasets (canonical rows), plus class names.

    Returns:
        ``(train, validation, class_names)``.
    """
    from offseg_hf.data.loading import load_segmentation_dataset

    if config.dataset == "synthetic":
        from offseg_hf.data.synthetic import synthetic_class_names

        common = {"num_labels": config.num_labels, "image_size": config.image_size, "seed": config.seed}
        train = load_segmentation_dataset("synthetic", "train", num_samples=config.train_samples, **common)
        validation = load_segmentation_dataset("synthetic", "validation", num_samples=config.eval_samples, **common)
        return train, validation, synthetic_class_names(config.num_labels)
    from offseg_hf.data.registry import get_dataset_info

    hub_kwargs = {}
    if config.hub_id:
        hub_kwargs = {"image_column": config.image_column, "label_column": config.label_column,
                      "label_format": config.label_format, "revision": config.hub_revision}
    train = load_segmentation_dataset(config.dataset, "train", config.data_dir, config.hub_id, **hub_kwargs)
    validation = load_segmentation_dataset(config.dataset, "validation", config.data_dir, config.hub_id, **hub_kwargs)
    return train, validation, list(get_dataset_info(config.dataset).class_names)


def _limit(dataset, count: int | None):
    if count is None:
        return dataset
    if hasattr(dataset, "take") and not hasattr(dataset, "select"):
        return dataset.take(count)
    return dataset.select(range(min(count, len(dataset))))


def build_trainer(config: TrainConfig):
    """The configured ``OffSegTrainer`` (model, data, optimiser, schedule, metrics, callbacks).

    Returns:
        ``(trainer, processor)``.
    """
    from transformers import TrainingArguments

    from offseg_hf.data.check import ensure_clean
    from offseg_hf.data.pipeline import ExampleTransform, SegmentationCollator, attach_transform
    from offseg_hf.data.transforms import build_test_transform, build_train_transform
    from offseg_hf.evaluation.evaluate import protocol_for
    from offseg_hf.inference.image_processing_offseg import build_image_processor
    from offseg_hf.evaluation.metrics import SegmentationMetricsForTrainer, preprocess_logits_for_metrics

    num_processes = _num_processes(config.use_cpu)
    per_device = config.per_device_batch_size
    if per_device is None:
        per_device, remainder = divmod(config.global_batch_size, num_processes * config.gradient_accumulation_steps)
        if remainder or per_device < 1:
            raise ValueError(
                f"global batch {config.global_batch_size} is not divisible by {num_processes} processes × "
                f"{config.gradient_accumulation_steps} accumulation steps; set per_device_batch_size"
            )

    train_raw, validation_raw, class_names = load_datasets(config)
    # the dataset check (fast; a full one with --skip-bad-samples): bad files stop here, named, not mid-run
    train_raw = ensure_clean(train_raw, f"{config.dataset} train", skip_bad_samples=config.skip_bad_samples)
    validation_raw = ensure_clean(_limit(validation_raw, config.eval_max_samples), f"{config.dataset} validation",
                                  skip_bad_samples=config.skip_bad_samples)
    id2label = dict(enumerate(class_names))
    train_transform = ExampleTransform(
        build_train_transform(config.crop_size, config.train_scale, cat_max_ratio=config.cat_max_ratio,
                              photometric=config.photometric),
        seed=config.seed,
    )
    eval_transform = ExampleTransform(build_test_transform(config.test_scale))
    train_dataset = attach_transform(train_raw, train_transform)
    eval_dataset = attach_transform(validation_raw, eval_transform)

    from transformers import set_seed

    set_seed(config.seed)  # same initial weights for the same seed, whatever ran before in this process
    model = build_model(config, id2label)
    device_type = "cpu" if config.use_cpu or not torch.cuda.is_available() else "cuda"
    model = maybe_sync_batch_norm(model, num_processes, device_type)
    ignore_index = model.config.semantic_loss_ignore_index  # labels, loss and metrics agree on it

    args = TrainingArguments(
        output_dir=config.output_dir,
        max_steps=config.max_steps,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=config.eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        eval_strategy="steps",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=True,  # resolve_config made save_steps a multiple of eval_steps
        metric_for_best_model="mIoU",
        greater_is_better=True,
        batch_eval_metrics=True,
        logging_steps=config.logging_steps,
        seed=config.seed,
        data_seed=config.seed,
        bf16=config.mixed_precision == "bf16",
        fp16=config.mixed_precision == "fp16",
        dataloader_num_workers=config.num_workers,
        remove_unused_columns=False,
        label_names=["labels"],
        report_to=config.report_to,
        use_cpu=config.use_cpu,
        ddp_find_unused_parameters=False,
        push_to_hub=bool(config.push_to_hub),
        hub_model_id=config.push_to_hub,
        hub_strategy="end",  # one push of the final model, processor and card, not every checkpoint
        hub_private_repo=config.hub_private,
        disable_tqdm=config.quiet,
        dataloader_pin_memory=device_type == "cuda",  # pinning is for host-to-GPU copies (and warns on CPU)
        **config.extra,
    )
    # the same processor as a converted folder of this dataset (keep-ratio test resize, normalisation, label reduction)
    processor = build_image_processor(config.dataset, scale=config.test_scale or protocol_for(config.dataset, config.image_size).scale)
    trainer_class, epoch_callback, time_budget, stop_on_interrupt = _trainer_classes()
    callbacks = [epoch_callback(train_transform), stop_on_interrupt()]
    if config.time_budget_s:
        callbacks.append(time_budget(config.time_budget_s))
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=SegmentationCollator(len(class_names), ignore_index),
        processing_class=processor,
        compute_metrics=SegmentationMetricsForTrainer(len(class_names), ignore_index, class_names=class_names),
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        callbacks=callbacks,
        recipe=config,
    )
    if config.quiet:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer, processor


def last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest *complete* ``checkpoint-N`` folder in ``output_dir``, or ``None``; incomplete ones (an
    interrupted save) are named in a warning and skipped (:func:`offseg_hf.training.checkpoints.newest_complete_checkpoint`)."""
    checkpoint, skipped = newest_complete_checkpoint(output_dir)
    for line in skipped:
        logger.warning("--resume: skipping %s", line)
    return checkpoint


class TrainingInterrupted(Exception):
    """Training stopped on Ctrl-C / SIGTERM after saving a complete checkpoint (``checkpoint``)."""

    def __init__(self, signal_name: str, step: int, checkpoint: str | None):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        super().__init__(f"{signal_name} at step {step}; checkpoint {checkpoint}")


def _save_final_model(trainer, processor, output_dir: str) -> None:
    """The final model and processor into ``output_dir``, each file through a staging folder and a rename;
    ``config.json`` comes last, so a folder that loads holds the complete model."""
    staged = Path(output_dir, STAGING_DIR, "final-model")
    if trainer.is_world_process_zero():
        shutil.rmtree(staged, ignore_errors=True)
    trainer.save_model(str(staged))
    if trainer.is_world_process_zero():
        processor.save_pretrained(staged)
        from offseg_hf.training.checkpoints import fsync_tree

        fsync_tree(staged)
        names = sorted((p.name for p in staged.iterdir()), key=lambda name: name == "config.json")
        for name in names:
            os.replace(staged / name, Path(output_dir, name))
        shutil.rmtree(staged, ignore_errors=True)
        try:
            Path(output_dir, STAGING_DIR).rmdir()
        except OSError:
            pass


def write_synthetic_samples(config: TrainConfig, folder: Path, count: int = 4) -> list[Path]:
    """Save the first ``count`` validation scenes (``val_000.png`` …) and their colour-coded ground truth
    (``val_000_gt.png``), so the quick-start has images to run ``offseg predict`` on."""
    import numpy as np
    from PIL import Image

    from offseg_hf.data.synthetic import SyntheticScenes, synthetic_palette

    folder.mkdir(parents=True, exist_ok=True)
    scenes = SyntheticScenes(config.num_labels, config.image_size, config.seed)
    palette = np.asarray(synthetic_palette(config.num_labels), dtype=np.uint8)
    paths = []
    for index in range(count):
        image, label = scenes.generate(index, "validation")
        path = folder / f"val_{index:03d}.png"
        Image.fromarray(image).save(path)
        Image.fromarray(palette[label]).save(folder / f"val_{index:03d}_gt.png")
        paths.append(path)
    return paths


def train(config: TrainConfig) -> dict[str, Any]:
    """Run training (resuming from the newest complete checkpoint when ``config.resume``), evaluate, save, push.

    Writes to ``output_dir``: checkpoints, the final (best) model with its processor, ``train_config.json``
    ``eval_results.json``, ``log_history.json`` (losses, learning rates, evaluations) and, for the
    synthetic dataset, ``samples/`` (a few validation scenes and their ground truth). Every file and
    checkpoint folder appears only when complete (:mod:`offseg_hf.training.checkpoints`). Returns the final
    evaluation metrics.

    Raises:
        TrainingInterrupted: Ctrl-C / SIGTERM: the current step finished and a checkpoint was saved.
    """
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    trainer, processor = build_trainer(config)
    if trainer.is_world_process_zero():
        atomic_write_text(Path(config.output_dir, "train_config.json"), config.to_json())
    checkpoint = None
    if config.resume:
        checkpoint = last_checkpoint(config.output_dir)
        if checkpoint is None:
            logger.warning("--resume: no complete checkpoint in %s, starting from scratch", config.output_dir)
        else:
            logger.info("resuming from %s", checkpoint)
    interrupt = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "StopOnInterrupt")
    trainer.train(resume_from_checkpoint=checkpoint)
    if interrupt.signal_name is not None:
        saved = os.path.join(config.output_dir, f"checkpoint-{trainer.state.global_step}")
        raise TrainingInterrupted(interrupt.signal_name, trainer.state.global_step, saved if os.path.isdir(saved) else None)
    metrics = trainer.evaluate()
    _save_final_model(trainer, processor, config.output_dir)
    if trainer.is_world_process_zero():
        summary = {k: v for k, v in metrics.items() if not k.startswith("eval_IoU-")}
        atomic_write_text(Path(config.output_dir, "eval_results.json"), json.dumps(metrics, indent=2))
        atomic_write_text(Path(config.output_dir, "log_history.json"), json.dumps(trainer.state.log_history, indent=1))
        logger.info("final evaluation: %s", summary)
    if config.dataset == "synthetic" and trainer.is_world_process_zero():
        write_synthetic_samples(config, Path(config.output_dir) / "samples")
    if config.push_to_hub:
        trainer.push_to_hub(
            commit_message="OffSeg trained with offseg-hf",
            model_name=Path(config.push_to_hub).name,
            dataset=config.dataset,
            tags=["offseg", "semantic-segmentation"],
        )
    return metrics
