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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "RECIPES",
    "TrainConfig",
    "build_param_groups",
    "build_trainer",
    "is_head_parameter",
    "resolve_config",
    "train",
    "warmup_poly_factor",
]

# Per dataset: the reference schedule, batch, crop and resize scales.
RECIPES: dict[str, dict[str, Any]] = {
    "ade20k": {"max_steps": 160_000, "global_batch_size": 16, "crop_size": 512, "train_scale": (2048, 512),
               "test_scale": (2048, 512), "eval_batch_size": 1},
    "coco-stuff": {"max_steps": 80_000, "global_batch_size": 16, "crop_size": 512, "train_scale": (2048, 512),
                   "test_scale": (2048, 512), "eval_batch_size": 1},
    "cityscapes": {"max_steps": 160_000, "global_batch_size": 8, "crop_size": 1024, "train_scale": (2048, 1024),
                   "test_scale": (2048, 1024), "eval_batch_size": 1},
    "pascal-context": {"max_steps": 80_000, "global_batch_size": 16, "crop_size": 480, "train_scale": (520, 520),
                       "test_scale": (520, 520), "eval_batch_size": 1},
    # CPU-sized: 64×64 scenes, resized by 0.5–2.0 and cropped back to 64.
    "synthetic": {"max_steps": 300, "global_batch_size": 8, "crop_size": 64, "train_scale": (64, 64),
                  "test_scale": None, "eval_batch_size": 8, "warmup_steps": 30, "eval_steps": 100,
                  "logging_steps": 10, "learning_rate": 6e-4},
}


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
    if config.save_steps is None:
        config.save_steps = config.eval_steps
    if config.logging_steps is None:
        config.logging_steps = 50
    for key in ("train_scale", "test_scale"):
        if getattr(config, key) is not None:
            setattr(config, key, tuple(getattr(config, key)))
    if config.classifier not in ("offset-learning", "per-pixel"):
        raise ValueError(f"classifier must be offset-learning or per-pixel, got {config.classifier!r}")
    if config.mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {config.mixed_precision!r}")
    return config


def _canonical_dataset(name: str) -> str:
    if name.lower() == "synthetic":
        return "synthetic"
    from offseg_hf.data.tables import get_dataset_info

    return get_dataset_info(name).name


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

    class OffSegTrainer(Trainer):
        """``Trainer`` with the recipe's parameter groups and warm-up + poly schedule.

        Under several processes, evaluation label maps are padded to a common size (``-100``) before
        the Trainer gathers them, which otherwise only pads dimension 1.
        """

        def __init__(self, *args, recipe: TrainConfig, **kwargs):
            self.recipe = recipe
            super().__init__(*args, **kwargs)

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
                from offseg_hf.metrics import LABEL_PAD_VALUE

                labels = self.accelerator.pad_across_processes(labels, dim=2, pad_index=LABEL_PAD_VALUE)
            return loss, logits, labels

    return OffSegTrainer, EpochForAugmentation, TimeBudget


def _num_processes() -> int:
    from accelerate import PartialState

    return PartialState().num_processes


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
    from offseg_hf.configuration_offseg import OFFSEG_PRESETS
    from offseg_hf.configuration_segnext import SEGNEXT_PRESETS

    label2id = {name: index for index, name in id2label.items()}
    labels = {"num_labels": len(id2label), "id2label": id2label, "label2id": label2id}
    name = config.model.lower()
    if name in OFFSEG_PRESETS:
        model = OffSegForSemanticSegmentation(OffSegConfig.from_preset(config.model, **labels))
    elif name.removesuffix("-offset") in SEGNEXT_PRESETS:
        if name.endswith("-offset") and config.classifier == "per-pixel":
            raise ValueError(f"--model {config.model} is SegNeXt with offset learning; use {name.removesuffix('-offset')} "
                             "for the per-pixel classifier")
        model = SegNextForSemanticSegmentation(SegNextConfig.from_preset(config.model, **labels))
    elif AutoConfig.from_pretrained(config.model).model_type == SegNextConfig.model_type:
        model = SegNextForSemanticSegmentation.from_pretrained(config.model, ignore_mismatched_sizes=True, **labels)
    else:
        model = OffSegForSemanticSegmentation.from_pretrained(config.model, ignore_mismatched_sizes=True, **labels)
    is_segnext = isinstance(model, SegNextForSemanticSegmentation)
    if config.classifier == "per-pixel" and not is_segnext:
        use_per_pixel_classifier(model)
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


class PerPixelClassifier(nn.Module):
    """The baseline of the paper's Table 6: a 1×1 convolution ``(B, C, H, W) -> (B, K, H, W)``."""

    def __init__(self, hidden_size: int, num_labels: int):
        super().__init__()
        self.classifier = nn.Conv2d(hidden_size, num_labels, kernel_size=1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)


def use_per_pixel_classifier(model: nn.Module) -> nn.Module:
    """Replace ``model.offset_learning`` by a :class:`PerPixelClassifier` (in place; returns the model).

    For ablations only: the result does not save/load as an ``OffSegForSemanticSegmentation``.
    """
    config = model.config
    model.offset_learning = PerPixelClassifier(config.decoder_hidden_size, config.num_labels)
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
    from offseg_hf.data.tables import get_dataset_info

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

    from offseg_hf.data.pipeline import ExampleTransform, attach_transform, collate_segmentation
    from offseg_hf.data.transforms import build_test_transform, build_train_transform
    from offseg_hf.image_processing_offseg import OffSegImageProcessor
    from offseg_hf.metrics import SegmentationMetricsForTrainer, preprocess_logits_for_metrics

    num_processes = _num_processes()
    per_device = config.per_device_batch_size
    if per_device is None:
        per_device, remainder = divmod(config.global_batch_size, num_processes * config.gradient_accumulation_steps)
        if remainder or per_device < 1:
            raise ValueError(
                f"global batch {config.global_batch_size} is not divisible by {num_processes} processes × "
                f"{config.gradient_accumulation_steps} accumulation steps; set per_device_batch_size"
            )

    train_raw, validation_raw, class_names = load_datasets(config)
    id2label = dict(enumerate(class_names))
    train_transform = ExampleTransform(
        build_train_transform(config.crop_size, config.train_scale, cat_max_ratio=config.cat_max_ratio,
                              photometric=config.photometric),
        seed=config.seed,
    )
    eval_transform = ExampleTransform(build_test_transform(config.test_scale))
    train_dataset = attach_transform(train_raw, train_transform)
    eval_dataset = attach_transform(_limit(validation_raw, config.eval_max_samples), eval_transform)

    from transformers import set_seed

    set_seed(config.seed)  # same initial weights for the same seed, whatever ran before in this process
    model = build_model(config, id2label)
    device_type = "cpu" if config.use_cpu or not torch.cuda.is_available() else "cuda"
    model = maybe_sync_batch_norm(model, num_processes, device_type)

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
        load_best_model_at_end=config.save_steps % config.eval_steps == 0,
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
        **config.extra,
    )
    processor = OffSegImageProcessor()
    trainer_class, epoch_callback, time_budget = _trainer_classes()
    callbacks = [epoch_callback(train_transform)]
    if config.time_budget_s:
        callbacks.append(time_budget(config.time_budget_s))
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collate_segmentation,
        processing_class=processor,
        compute_metrics=SegmentationMetricsForTrainer(len(class_names), class_names=class_names),
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        callbacks=callbacks,
        recipe=config,
    )
    return trainer, processor


def last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` folder in ``output_dir``, or ``None``."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None


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
    """Run training (resuming from the last checkpoint when ``config.resume``), evaluate, save, push.

    Writes to ``output_dir``: checkpoints, the final (best) model with its processor, ``train_config.json``
    ``eval_results.json``, ``log_history.json`` (losses, learning rates, evaluations) and, for the
    synthetic dataset, ``samples/`` (a few validation scenes and their ground truth). Returns the final evaluation metrics.
    """
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    trainer, processor = build_trainer(config)
    if trainer.is_world_process_zero():
        Path(config.output_dir, "train_config.json").write_text(config.to_json())
    checkpoint = None
    if config.resume:
        checkpoint = last_checkpoint(config.output_dir)
        if checkpoint is None:
            logger.warning("--resume: no checkpoint in %s, starting from scratch", config.output_dir)
        else:
            logger.info("resuming from %s", checkpoint)
    trainer.train(resume_from_checkpoint=checkpoint)
    metrics = trainer.evaluate()
    trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(config.output_dir)
        summary = {k: v for k, v in metrics.items() if not k.startswith("eval_IoU-")}
        Path(config.output_dir, "eval_results.json").write_text(json.dumps(metrics, indent=2))
        Path(config.output_dir, "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
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
