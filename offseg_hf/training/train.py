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

Arguments: :class:`ModelArguments`, :class:`DataArguments` and :class:`OffSegTrainingArguments` (a
``TrainingArguments``), parsed by ``transformers.HfArgumentParser`` from flags (:func:`parse_train_argv`) and
JSON / YAML files; :func:`resolve_config` merges recipe ← config file ← command line into a
:class:`TrainConfig` ``(model_args, data_args, training_args)``. The world size (and so the per-device batch)
is the one these ``TrainingArguments`` set up, which is the Trainer's.

The schedule is :func:`warmup_poly_factor`, not transformers' ``polynomial`` schedule: that one decays the
same way but warms up from 0 instead of the recipe's 1e-6 (see the tests).

Entry points: :func:`resolve_config`, :func:`build_trainer`, :func:`train`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import HubStrategy, IntervalStrategy, SchedulerType
from transformers.training_args import OptimizerNames

from offseg_hf.data.registry import DATASETS, get_dataset
from offseg_hf.training.checkpoints import (
    STAGING_DIR, atomic_write_text, checkpoint_problems, describe_write_error, discard_interrupted_saves,
    ensure_free_space, folder_bytes, is_write_failure, newest_complete_checkpoint, publish_folder,
)

logger = logging.getLogger(__name__)

__all__ = [
    "RECIPES",
    "DataArguments",
    "ModelArguments",
    "OffSegTrainingArguments",
    "TrainConfig",
    "argument_parser",
    "build_param_groups",
    "build_trainer",
    "cli_spec",
    "dataset_recipe",
    "is_head_parameter",
    "parse_train_argv",
    "resolve_config",
    "TrainingInterrupted",
    "train",
    "warmup_poly_factor",
]

# Per dataset: the reference schedule, batch, crop and resize scales (each dataset's spec in the registry).
RECIPES: dict[str, dict[str, Any]] = {name: spec.training_defaults() for name, spec in DATASETS.items()}

# recipe keys whose field has another name
_RECIPE_FIELDS = {"eval_batch_size": "per_device_eval_batch_size"}


def dataset_recipe(dataset: str) -> dict[str, Any]:
    """The training recipe of ``dataset`` (canonical name), keyed by argument field names.

    The one place this module reads the per-dataset recipe table.
    """
    return {_RECIPE_FIELDS.get(key, key): value for key, value in RECIPES[dataset].items()}


def _arg(help: str, default: Any = dataclasses.MISSING, aliases: list[str] | None = None, **kwargs) -> Any:
    """A dataclass field for :class:`~transformers.HfArgumentParser` with its help (and flag aliases)."""
    metadata = {"help": help, **({"aliases": aliases} if aliases else {})}
    if "default_factory" in kwargs:
        return field(metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


_RECIPE = "recipe: "  # help texts of values the dataset's recipe fills in


@dataclass
class ModelArguments:
    """Which model to train."""

    model: str = _arg("offseg-t | offseg-b | offseg-l, segnext-t | -s | -b | -l (per-pixel) or segnext-t-offset … "
                      "(offset learning), mask2former-swin-t | mask2former-swin-t-offset, or a folder / Hub id "
                      "user/name to fine-tune (default: offseg-t)", "offseg-t")
    classifier: Literal["offset-learning", "per-pixel"] = _arg(
        "per-pixel: a 1×1 conv instead of offset learning (ablation, paper Table 6) (default: offset-learning)",
        "offset-learning")
    backbone_weights: str | None = _arg(
        "EfficientFormerV2Backbone (OffSeg), MscanBackbone (SegNeXt) or Swin (Mask2Former; e.g. "
        "microsoft/swin-tiny-patch4-window7-224) folder / Hub id with ImageNet weights (default: none, random init)",
        None)


@dataclass
class DataArguments:
    """Which data, and the training / test pipeline."""

    dataset: str = _arg("synthetic, ade20k, coco-stuff, cityscapes or pascal-context (default: synthetic)", "synthetic")
    data_dir: str | None = _arg("root of the dataset's official local layout (default: none; needed unless --hub-id "
                                "or synthetic)", None)
    hub_id: str | None = _arg("stream this Hub parquet dataset instead, e.g. zhoubolei/scene_parse_150 (default: none)",
                              None)
    image_column: str | None = _arg("Hub image column (default: per known repo, else 'image')", None)
    label_column: str | None = _arg("Hub label column (default: per known repo, else 'label')", None)
    label_format: str | None = _arg("Hub label encoding: train-ids, reduce, coco-stuff-raw or cityscapes-label-ids "
                                    "(default: per known repo)", None)
    dataset_revision: str | None = _arg("revision of the --hub-id dataset (default: main; scene_parse_150: "
                                        "refs/convert/parquet)", None)
    skip_bad_samples: bool = _arg("train on the samples that pass the dataset check and report how many were "
                                  "skipped, instead of stopping at the first bad one (default: stop)", False)
    num_labels: int = _arg("synthetic: number of classes (default: 8)", 8)
    train_samples: int = _arg("synthetic: training scenes (default: 2000)", 2000)
    eval_samples: int = _arg("synthetic: validation scenes (default: 100)", 100)
    image_size: int = _arg("synthetic: scene side in pixels (default: 64)", 64)
    eval_max_samples: int | None = _arg("evaluate on the first N validation images only (default: all)", None)
    crop_size: int | None = _arg(f"training crop (default: {_RECIPE}512; Cityscapes 1024; Pascal Context 480; "
                                 "synthetic 64)", None)
    train_scale: list[int] | None = _arg(f"random-resize scale LONG SHORT (default: {_RECIPE}2048 512; Cityscapes "
                                         "2048 1024; Pascal Context 520 520; synthetic 64 64)", None)
    test_scale: list[int] | None = _arg(f"test resize scale LONG SHORT (default: {_RECIPE}as --train-scale; "
                                        "synthetic none)", None)
    cat_max_ratio: float = _arg("random-crop category max ratio (default: 0.75)", 0.75)
    photometric: bool = _arg("photometric distortion; --no-photometric disables it (default: on)", True)

    def __post_init__(self):
        for name in ("train_scale", "test_scale"):
            value = getattr(self, name)
            if value is not None:
                if len(value) != 2:
                    raise ValueError(f"--{name.replace('_', '-')} needs two integers LONG SHORT, got {list(value)}")
                setattr(self, name, [int(v) for v in value])


@dataclass
class OffSegTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the paper's recipe as defaults, plus OffSeg's own options.

    The recipe's per-dataset values (``max_steps``, the batch sizes, ``eval_steps`` …) are ``None`` here and
    filled by :func:`resolve_config` from :func:`dataset_recipe`; ``per_device_train_batch_size`` left unset is
    ``global_batch_size / (world size × gradient_accumulation_steps)``, with the world size of these
    arguments' own device setup (``world_size``: ``torchrun`` / ``accelerate launch``, CPU or GPU alike).
    """

    # -- TrainingArguments fields with the recipe's defaults
    output_dir: str | None = _arg("checkpoints and the final model (default: outputs/offseg)", "outputs/offseg")
    max_steps: int | None = _arg(f"optimiser steps (default: {_RECIPE}160000 ADE20K/Cityscapes, 80000 "
                                 "COCO-Stuff/Pascal Context, 300 synthetic)", None)
    per_device_train_batch_size: int | None = _arg(
        "images per process and step (default: global batch / (processes × accumulation steps))", None,
        aliases=["--per-device-batch-size"])
    per_device_eval_batch_size: int | None = _arg(f"evaluation images per process (default: {_RECIPE}1; synthetic 8)",
                                                  None, aliases=["--eval-batch-size", "--eval_batch_size"])
    learning_rate: float | None = _arg(f"backbone learning rate (default: {_RECIPE}6e-5; synthetic 6e-4)", None)
    weight_decay: float = _arg("AdamW weight decay (default: 0.01)", 0.01)
    optim: OptimizerNames | str = _arg("optimiser implementation; the recipe is AdamW (default: adamw_torch_fused, "
                                       "AdamW as one fused kernel; adamw_torch is the per-tensor loop)",
                                       "adamw_torch_fused")
    torch_compile: bool = _arg("train the torch.compile'd model (inductor; the first steps compile) (default: off)",
                               False, aliases=["--compile"])
    lr_scheduler_type: SchedulerType | str = _arg(
        "polynomial: the recipe's linear warm-up from --warmup-start-factor, then (1 - progress) ** --poly-power "
        "(warmup_poly_factor; transformers' own polynomial schedule warms up from 0, not 1e-6); any other "
        "transformers schedule by name (default: polynomial)", "polynomial")
    warmup_steps: float | None = _arg("linear warm-up steps (default: 1500; synthetic 30)", None)
    eval_strategy: IntervalStrategy | str = _arg("evaluate every --eval-steps (default: steps)", "steps")
    eval_steps: float | None = _arg(f"evaluate every N steps (default: {_RECIPE}max steps / 10, at most 16000; "
                                    "synthetic 100; with only --save-steps given, the save interval)", None)
    save_steps: float | None = _arg("checkpoint every N steps, a multiple of --eval-steps (default: the eval steps)",
                                    None)
    save_total_limit: int | None = _arg("checkpoints kept (the newest and the best always are) (default: 2)", 2)
    logging_steps: float | None = _arg("log the loss every N steps (default: 50; synthetic 10)", None)
    load_best_model_at_end: bool = _arg("keep the checkpoint with the best --metric-for-best-model (default: on)", True)
    metric_for_best_model: str | None = _arg("(default: mIoU)", "mIoU")
    batch_eval_metrics: bool = _arg("streaming evaluation metrics (no logits kept) (default: on)", True)
    remove_unused_columns: bool = _arg("(default: off; the collator reads the columns it needs)", False)
    label_names: list[str] | None = _arg("(default: labels)", default_factory=lambda: ["labels"])
    report_to: str | None = _arg("none, tensorboard, wandb … (default: none)", "none")
    seed: int = _arg("seed of the initial weights, data order and augmentations (default: 0)", 0)
    data_seed: int | None = _arg("seed of the data order (default: --seed)", None)
    dataloader_num_workers: int = _arg("data loader workers per process (default: 2)", 2,
                                       aliases=["--num-workers", "--num_workers"])
    dataloader_pin_memory: bool | None = _arg("pin host memory for GPU copies (default: on for CUDA runs)", None)
    ddp_find_unused_parameters: bool | None = _arg("(default: off; every parameter gets a gradient)", False)
    hub_strategy: HubStrategy | str = _arg("(default: end: one push of the final model, processor and card)", "end")
    # -- OffSeg's own
    global_batch_size: int | None = _arg(f"images per optimiser step over all processes (default: {_RECIPE}16; "
                                         "Cityscapes 8; synthetic 8)", None)
    head_lr_mult: float = _arg("head learning-rate multiplier (default: 10)", 10.0)
    warmup_start_factor: float = _arg("learning-rate factor at step 0 of the warm-up (default: 1e-6)", 1e-6)
    poly_power: float = _arg("power of the poly decay after the warm-up (default: 1.0)", 1.0)
    no_decay_class_embeddings: bool = _arg(
        "exempt the class embeddings from weight decay (default: decayed, as the reference)", False)
    time_budget_s: float | None = _arg("also stop after this many seconds of wall time; results then depend on the "
                                       "machine's speed (default: none)", None)
    resume: bool = _arg("continue from the newest complete checkpoint in --output-dir (default: start afresh)", False)

    def __post_init__(self):
        missing = [name for name in _FILLED_BY_RECIPE if getattr(self, name) is None]
        if missing:
            raise ValueError(f"OffSegTrainingArguments: {', '.join(missing)} not set; build the arguments with "
                             "offseg_hf.training.resolve_config, which fills them from the dataset's recipe")
        if self.data_seed is None:
            self.data_seed = self.seed
        super().__post_init__()
        world = self.world_size  # sets up the devices as the Trainer will (use_cpu / ACCELERATE_USE_CPU honoured)
        accumulation = self.gradient_accumulation_steps
        if self.per_device_train_batch_size is None:
            if self.global_batch_size is None:
                raise ValueError("set --global-batch-size or --per-device-train-batch-size")
            per_device, remainder = divmod(self.global_batch_size, world * accumulation)
            if remainder or per_device < 1:
                raise ValueError(
                    f"global batch {self.global_batch_size} is not divisible by {world} processes × {accumulation} "
                    "accumulation steps; set --per-device-train-batch-size")
            self.per_device_train_batch_size = per_device
        elif self.global_batch_size is None:
            self.global_batch_size = self.per_device_train_batch_size * world * accumulation
        elif self.per_device_train_batch_size * world * accumulation != self.global_batch_size:
            raise ValueError(
                f"--per-device-train-batch-size {self.per_device_train_batch_size} × {world} processes × "
                f"{accumulation} accumulation steps is not --global-batch-size {self.global_batch_size}; give one of them")
        if self.dataloader_pin_memory is None:
            self.dataloader_pin_memory = self.device.type == "cuda"  # pinning is for host-to-GPU copies (warns on CPU)


# fields the recipe (or resolve_config's rules) always fills
_FILLED_BY_RECIPE = ("max_steps", "per_device_eval_batch_size", "learning_rate", "warmup_steps", "eval_steps",
                     "save_steps", "logging_steps")
_DEFAULTS_OF_ALL_RECIPES = {"learning_rate": 6e-5, "warmup_steps": 1500, "logging_steps": 50}

MASK2FORMER_PRESETS = ("mask2former-swin-t", "mask2former-swin-t-offset")
"""Mask2Former-Swin-T of the paper's Table 5, plain and with offset learning (``offseg train --model …``)."""

# Mask2Former's own recipe (mmsegmentation's mask2former_swin-t_8xb2-160k_ade20k-512x512, which the offset-learning
# config keeps): AdamW lr 1e-4 for the head, 0.1× for the Swin backbone, weight decay 0.05, no warm-up, poly 0.9,
# gradient clipping at L2 norm 0.01. The synthetic dataset scales the learning rate by 10, as it does for OffSeg.
_MASK2FORMER_RECIPE = {"learning_rate": 1e-5, "head_lr_mult": 10.0, "weight_decay": 0.05, "warmup_steps": 0,
                       "poly_power": 0.9, "max_grad_norm": 0.01}
_SYNTHETIC_LR_FACTOR = 10.0
_ARGUMENT_CLASSES = (ModelArguments, DataArguments, OffSegTrainingArguments)


class TrainConfig(NamedTuple):
    """A training run's arguments: ``model_args, data_args, training_args = resolve_config(...)``."""

    model_args: ModelArguments
    data_args: DataArguments
    training_args: OffSegTrainingArguments

    def to_dict(self) -> dict[str, Any]:
        """All fields, one flat mapping (what ``train_config.json`` holds; a valid ``--config`` file)."""
        return {**dataclasses.asdict(self.model_args), **dataclasses.asdict(self.data_args),
                **self.training_args.to_dict()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def argument_parser() -> HfArgumentParser:
    """The ``HfArgumentParser`` of ``offseg train`` (model, data and training arguments, plus ``--config``)."""
    parser = HfArgumentParser(_ARGUMENT_CLASSES)
    parser.add_argument("--config", dest="config_file",
                        help="JSON / YAML file of options (keys = option names); flags win over it (default: none)")
    return parser


def _field_names() -> set[str]:
    return {f.name for cls in _ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.init}


# Option names of earlier versions (config files and programmatic overrides).
_LEGACY_KEYS = {"eval_batch_size": "per_device_eval_batch_size", "per_device_batch_size": "per_device_train_batch_size",
                "num_workers": "dataloader_num_workers", "hub_private": "hub_private_repo"}


def _translate_legacy(values: dict[str, Any]) -> dict[str, Any]:
    """Earlier option names: ``mixed_precision: bf16`` → ``bf16: true``, ``push_to_hub: user/repo`` →
    ``push_to_hub: true, hub_model_id: user/repo``, ``extra: {...}`` (TrainingArguments fields) merged, renames."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        key = key.replace("-", "_")
        if key == "extra":
            out.update(_translate_legacy(dict(value or {})))
        elif key == "mixed_precision":
            if value not in ("no", "bf16", "fp16", None):
                raise ValueError(f"mixed_precision must be no, bf16 or fp16, got {value!r}")
            if value in ("bf16", "fp16"):
                out[value] = True
        elif key == "push_to_hub" and isinstance(value, str) and value.lower() not in ("true", "false", "yes", "no"):
            out["push_to_hub"], out["hub_model_id"] = True, value
        elif key == "quiet":  # the CLI's --quiet: no progress bars
            if value:
                out["disable_tqdm"] = True
        else:
            out[_LEGACY_KEYS.get(key, key)] = value
    return out


def _load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON or YAML mapping of option names (dashes allowed in keys), values coerced to the fields' types."""
    import yaml

    path = Path(path)
    text = path.read_text()
    data = (yaml.safe_load(text) or {}) if path.suffix in (".yaml", ".yml") else json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of training options, got {type(data).__name__}")
    return data


def _coerce(parser: HfArgumentParser, values: dict[str, Any], source: str) -> dict[str, Any]:
    """String values of a config file through the option's argparse type (YAML reads ``6e-5`` as a string)."""
    types = {action.dest: action.type for action in parser._actions if action.type is not None}
    out = {}
    for key, value in values.items():
        convert = types.get(key)
        try:
            if convert is not None and isinstance(value, str):
                value = convert(value)
            elif convert is not None and isinstance(value, list) and all(isinstance(v, str) for v in value):
                value = [convert(v) for v in value]
        except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
            raise ValueError(f"{source}: {key}: {error}") from error
        out[key] = value
    return out


def resolve_config(overrides: dict[str, Any] | None = None, config_file: str | None = None) -> TrainConfig:
    """Recipe defaults ← config file ← ``overrides`` (``None`` values in ``overrides`` are skipped), parsed by
    ``HfArgumentParser.parse_dict`` into :class:`TrainConfig`.

    Rules on top of the recipe: ``eval_steps`` is max steps / 10 (at most 16,000) unless the recipe or the user
    sets it; with only ``save_steps`` given, evaluation follows the save interval (logged), so that every
    checkpoint can be the best one; otherwise ``save_steps`` must be a multiple of ``eval_steps``.

    Raises:
        ValueError: an unknown option (named, with the file it came from); save / eval steps that do not fit.
    """
    parser = argument_parser()
    names = _field_names()
    given: dict[str, Any] = {}
    sources: list[tuple[str, dict[str, Any]]] = []
    if config_file:
        sources.append((str(config_file), _load_config_file(config_file)))
    sources.append(("command line", dict(overrides or {})))
    for source, values in sources:
        values = {k: v for k, v in values.items() if v is not None}  # null / None: the default
        values = _coerce(parser, _translate_legacy(values), source)
        for key, value in values.items():
            if key not in names:
                raise ValueError(f"{source}: unknown training option {key!r} (see offseg train --help)")
            given[key] = value
    merged = dict(given)
    merged["dataset"] = _canonical_dataset(merged.get("dataset", "synthetic"))
    model_recipe = _model_recipe(merged.get("model", "offseg-t"), merged["dataset"])
    for key, value in {**_DEFAULTS_OF_ALL_RECIPES, **dataset_recipe(merged["dataset"]), **model_recipe}.items():
        merged.setdefault(key, list(value) if isinstance(value, tuple) else value)
    if "eval_steps" not in merged:
        merged["eval_steps"] = max(1, min(16_000, merged["max_steps"] // 10))
    if merged.get("load_best_model_at_end", True) and merged.get("eval_strategy", "steps") == "steps":
        _align_save_and_eval_steps(merged, given)
    merged.setdefault("save_steps", merged["eval_steps"])
    _check_model_name(merged.get("model", "offseg-t"))
    model_args, data_args, training_args = parser.parse_dict(merged)
    return TrainConfig(model_args, data_args, training_args)


def _is_mask2former(name: str) -> bool:
    """``--model`` names a Mask2Former preset or a local folder of a Mask2Former model (read from its config.json)."""
    from offseg_hf.inference.segment import MASK_CLASSIFICATION_MODEL_TYPES

    if name.lower() in MASK2FORMER_PRESETS:
        return True
    config_file = Path(name).expanduser() / "config.json"
    try:
        return json.loads(config_file.read_text()).get("model_type") in MASK_CLASSIFICATION_MODEL_TYPES
    except (OSError, ValueError):
        return False


def _model_recipe(name: str, dataset: str) -> dict[str, Any]:
    """Recipe values of the model family that differ from OffSeg's (Mask2Former's; none for the others)."""
    if not _is_mask2former(name):
        return {}
    recipe = dict(_MASK2FORMER_RECIPE)
    if dataset == "synthetic":
        recipe["learning_rate"] *= _SYNTHETIC_LR_FACTOR
    return recipe


def _align_save_and_eval_steps(merged: dict[str, Any], given: dict[str, Any]) -> None:
    """The best model (kept at the end) can only be chosen among evaluated checkpoints: ``save_steps`` a multiple of
    ``eval_steps``. Only ``save_steps`` given: evaluate at each checkpoint (said in the log); both given and
    incompatible: an error with a value that works."""
    if "save_steps" not in merged:
        return
    save, evaluate = merged["save_steps"], merged["eval_steps"]
    if save % evaluate == 0:
        return
    if "eval_steps" not in given:
        logger.warning("--save-steps %s is not a multiple of the recipe's eval steps %s: evaluating every %s steps "
                       "instead, so that each checkpoint can be kept as the best model", save, evaluate, save)
        merged["eval_steps"] = save
        return
    raise ValueError(
        f"save_steps {save} is not a multiple of eval_steps {evaluate}: the best model (kept at the end of "
        "training, --load-best-model-at-end) can only be chosen among evaluated checkpoints; use e.g. "
        f"--save-steps {evaluate * max(1, round(save / evaluate))}, or --load-best-model-at-end false")


def parse_train_argv(argv: list[str]) -> tuple[dict[str, Any], str | None]:
    """The options given on a command line (only those: defaults are left to :func:`resolve_config`), typed by
    ``HfArgumentParser``, and the ``--config`` file.

    Raises:
        SystemExit: argparse's error for an unknown option or a bad value (status 2).
    """
    parser = argument_parser()
    parser.prog, parser.usage = "offseg train", "%(prog)s [OPTION ...]   (offseg train --help lists them)"
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # an option left out is left out of the namespace
    namespace = parser.parse_args(argv)
    given = vars(namespace)
    return given, given.pop("config_file", None)


def cli_spec() -> list[dict[str, Any]]:
    """The options of :func:`argument_parser` as JSON-ready records (flags, help with its default, nargs, choices):
    what ``offseg train --help`` shows and its fast parser accepts without importing transformers
    (``offseg_hf/cli/train_options.json``, regenerated by :func:`write_cli_spec`)."""
    parser = argument_parser()
    own = set(OffSegTrainingArguments.__dict__.get("__annotations__", {}))  # declared or re-declared here
    groups = {f.name: name for cls, name in zip(_ARGUMENT_CLASSES, ("model", "data", "training")) for f in dataclasses.fields(cls)}
    records = []
    for action in parser._actions:
        if action.dest == "help":
            continue
        text = " ".join((action.help or "").split())
        if "(default:" not in text:
            default = action.default
            if isinstance(default, (list, tuple)):
                default = " ".join(str(v) for v in default)
            elif hasattr(default, "value"):  # an Enum member
                default = default.value
            text = f"{text} (default: {'none' if default is None else default})".strip()
        group = groups.get(action.dest, "run")
        if group == "training" and action.dest not in own:
            group = "Trainer"
        records.append({
            "flags": list(action.option_strings), "dest": action.dest, "group": group,
            "help": text, "nargs": action.nargs, "const": _json_value(action.const),
            "choices": [_json_value(c) for c in action.choices] if action.choices else None,
            "store_false": isinstance(action, argparse._StoreFalseAction),
        })
    return records


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return getattr(value, "value", str(value))


CLI_SPEC_PATH = Path(__file__).resolve().parents[1] / "cli" / "train_options.json"


def write_cli_spec(path: str | os.PathLike = CLI_SPEC_PATH) -> Path:
    """Regenerate the option records ``offseg train`` parses and shows (after changing an argument dataclass)."""
    path = Path(path)
    path.write_text(json.dumps(cli_spec(), indent=1, ensure_ascii=False) + "\n")
    return path


def _check_model_name(name: str) -> None:
    """``name`` is a preset, an existing folder or a Hub id ``user/name``; anything else fails here, before any
    Hub request, with the valid choices."""
    from offseg_hf.models.configuration_offseg import OFFSEG_PRESETS
    from offseg_hf.models.configuration_segnext import SEGNEXT_PRESETS
    from offseg_hf.inference.predict import HUB_ID

    presets = (sorted(OFFSEG_PRESETS) + sorted(SEGNEXT_PRESETS) + sorted(f"{key}-offset" for key in SEGNEXT_PRESETS)
               + list(MASK2FORMER_PRESETS))
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


# Mask2Former's embeddings without weight decay (the reference's custom keys query_embed, query_feat, level_embed of
# the transformer decoder, and Swin's relative_position_bias_table); the pixel decoder's level embedding (mmdet's
# level_encoding) keeps it, as in the reference.
_NO_DECAY_EMBEDDINGS = ("transformer_module.queries_embedder.", "transformer_module.queries_features.",
                        "transformer_module.level_embed.", "relative_position_bias_table")


def is_head_parameter(name: str) -> bool:
    """``True`` for decoder / offset-learning parameters, ``False`` for the backbone's.

    The backbone is every parameter under a module named ``backbone`` (``offseg.backbone.*``, SegNeXt's
    ``backbone.*``) and Mask2Former's Swin (``model.pixel_level_module.encoder.*``); SegNeXt's ``decode_head``,
    ``offset_learning`` and ``classifier`` and Mask2Former's pixel decoder and transformer decoder are the head.
    """
    return "backbone" not in name.split(".") and "pixel_level_module.encoder." not in name


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
    decay 0 — Mask2Former's query / level embeddings and Swin's relative position biases too, and the class
    embeddings when ``no_decay_class_embeddings``. Each group carries its ``name`` and ``param_names`` for inspection.
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
        no_decay = (id(parameter) in norm_params or any(key in name for key in _NO_DECAY_EMBEDDINGS)
                    or (no_decay_class_embeddings and name.endswith("class_embeddings")))
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

        def __init__(self, *args, **kwargs):
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
            needed = self._checkpoint_bytes(run_dir)
            if self.args.should_save:
                shutil.rmtree(staged, ignore_errors=True)
                try:
                    ensure_free_space(run_dir, needed, name)
                except OSError as error:
                    raise CheckpointSaveError(name, run_dir, str(error)) from error
            self.accelerator.wait_for_everyone()
            self._staging = True
            try:
                super()._save_checkpoint(model, trial)  # writes into `staged`; rotates nothing there
            except Exception as error:  # a full or failing disk: no partial folder may stay behind
                if self.args.should_save:
                    shutil.rmtree(staged, ignore_errors=True)
                    discard_interrupted_saves(run_dir)
                if not is_write_failure(error):
                    raise
                raise CheckpointSaveError(name, run_dir, f"{describe_write_error(error, staged)}; a checkpoint here "
                                          f"takes about {needed:,} bytes") from error
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

        def _checkpoint_bytes(self, run_dir: str) -> int:
            """What the next checkpoint will take: the newest saved one's size, or (first save) the model's
            weights and the optimizer's state as tensors hold them, plus 1 MiB for the small files."""
            from transformers.trainer_utils import get_last_checkpoint

            previous = get_last_checkpoint(run_dir)
            if previous is not None:
                return folder_bytes(previous)
            tensors = list(self.model.state_dict().values())
            optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
            for state in (optimizer.state.values() if optimizer is not None else ()):
                tensors += [value for value in state.values() if isinstance(value, torch.Tensor)]
            return sum(t.numel() * t.element_size() for t in tensors) + 2**20

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                groups = build_param_groups(
                    model if model is not None else self.model,
                    self.args.learning_rate,
                    self.args.weight_decay,
                    self.args.head_lr_mult,
                    self.args.no_decay_class_embeddings,
                )
                for group in groups:
                    group.pop("param_names")
                # --optim picks the implementation (default adamw_torch_fused: one fused kernel for all
                # parameters instead of ~10 ops per tensor); the groups carry the recipe's learning rates.
                optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
                self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            return self.optimizer

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            if self.args.lr_scheduler_type != SchedulerType.POLYNOMIAL:
                return super().create_scheduler(num_training_steps, optimizer)
            if self.lr_scheduler is None:
                factor = partial(
                    warmup_poly_factor,
                    max_steps=num_training_steps,
                    warmup_steps=self.args.get_warmup_steps(num_training_steps),
                    start_factor=self.args.warmup_start_factor,
                    power=self.args.poly_power,
                )
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
                self._created_lr_scheduler = True
            return self.lr_scheduler

        def _saves_renamed_weights(self) -> bool:
            """Whether ``save_pretrained`` writes this model's weights under other names than it holds them
            (transformers' conversion mappings: Mask2Former's Swin saves ``attention.self.query`` for ``q_proj`` …).
            The Trainer reloads checkpoints with a plain ``load_state_dict``, which would then match nothing."""
            if not hasattr(self, "_renamed_weights"):
                from transformers.core_model_loading import revert_weight_conversion

                state = dict(self.model.state_dict())
                self._renamed_weights = set(revert_weight_conversion(self.model, dict(state))) != set(state)
            return self._renamed_weights

        def _load_saved_weights(self, folder: str, model: nn.Module) -> None:
            """The weights of a checkpoint folder through ``from_pretrained`` (which applies the conversion mapping)."""
            target = self.accelerator.unwrap_model(model)
            loaded = type(target).from_pretrained(folder, config=target.config)
            target.load_state_dict(loaded.state_dict())

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            if not self._saves_renamed_weights():
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            self._load_saved_weights(resume_from_checkpoint, model if model is not None else self.model)

        def _load_best_model(self):
            if not self._saves_renamed_weights():
                return super()._load_best_model()
            logger.info("Loading best model from %s (score: %s).", self.state.best_model_checkpoint, self.state.best_metric)
            self._load_saved_weights(self.state.best_model_checkpoint, self.model)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            from offseg_hf.inference.segment import is_mask_classification

            if not is_mask_classification(self.model):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # Mask2Former: label maps → one binary mask + class per class present (reference _seg_data_to_instance_data)
            from offseg_hf.data.pipeline import semantic_to_mask_targets

            mask_labels, class_labels = semantic_to_mask_targets(inputs["labels"], self.model.config.ignore_value)
            outputs = model(pixel_values=inputs["pixel_values"], mask_labels=mask_labels, class_labels=class_labels)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

        def _mask_classification_prediction(self, model, inputs):
            """Mask2Former's evaluation: the reference's semantic scores ``(B, K, h, w)`` at the input size (the input
            zero-padded to a multiple of 32, as at test time, and cropped back); no loss (its targets would need the
            label maps at the network's input geometry, which evaluation keeps at the original size)."""
            from offseg_hf.inference.segment import (
                MASK_CLASSIFICATION_SIZE_DIVISOR,
                mask_classification_scores,
                pad_to_multiple,
            )

            inputs = self._prepare_inputs(inputs)
            pixel_values = inputs["pixel_values"]
            padded = pad_to_multiple(pixel_values, MASK_CLASSIFICATION_SIZE_DIVISOR)
            with torch.no_grad():
                outputs = model(pixel_values=padded)
                size = tuple(pixel_values.shape[-2:])
                scores = torch.stack([
                    mask_classification_scores(classes, masks, padded.shape[-2:], size)
                    for classes, masks in zip(outputs.class_queries_logits, outputs.masks_queries_logits)
                ]).to(pixel_values.device)
            return None, scores, inputs.get("labels")

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            from offseg_hf.inference.segment import is_mask_classification

            if is_mask_classification(self.model):
                loss, logits, labels = self._mask_classification_prediction(model, inputs)
            else:
                loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            if labels is not None and self.accelerator.num_processes > 1:
                from offseg_hf.evaluation.metrics import LABEL_PAD_VALUE

                labels = self.accelerator.pad_across_processes(labels, dim=2, pad_index=LABEL_PAD_VALUE)
            return loss, logits, labels

    return OffSegTrainer, EpochForAugmentation, TimeBudget, StopOnInterrupt


def build_model(config: ModelArguments | TrainConfig, id2label: dict[int, str]):
    """A fresh model from a preset or one loaded from a folder / Hub id.

    Presets: ``offseg-t``/``-b``/``-l``, and SegNeXt ``segnext-t``/``-s``/``-b``/``-l`` (per-pixel classifier) or
    ``segnext-t-offset`` … (offset learning; for SegNeXt the preset name chooses the classifier). A loaded
    model with a different number of classes gets a new classifier (``ignore_mismatched_sizes``).
    ``backbone_weights`` (a folder or Hub id of ``EfficientFormerV2Backbone`` weights for OffSeg, of
    ``MscanBackbone`` weights for SegNeXt, of a Swin model for Mask2Former) initialises the backbone.
    Mask2Former: ``mask2former-swin-t`` / ``mask2former-swin-t-offset`` (the preset name chooses offset learning), or
    a folder of either (``model_type`` ``mask2former`` / ``mask2former_offset``).
    """
    from transformers import AutoConfig

    from offseg_hf import OffSegConfig, OffSegForSemanticSegmentation, SegNextConfig, SegNextForSemanticSegmentation
    from offseg_hf.inference.segment import MASK_CLASSIFICATION_MODEL_TYPES, is_mask_classification
    from offseg_hf.models.configuration_offseg import OFFSEG_PRESETS
    from offseg_hf.models.configuration_segnext import SEGNEXT_PRESETS

    if isinstance(config, TrainConfig):
        config = config.model_args
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
    elif name in MASK2FORMER_PRESETS:
        model = _mask2former_preset(name, config.classifier, labels)
    elif (model_type := AutoConfig.from_pretrained(config.model).model_type) == SegNextConfig.model_type:
        model = SegNextForSemanticSegmentation.from_pretrained(config.model, ignore_mismatched_sizes=True, **labels)
    elif model_type in MASK_CLASSIFICATION_MODEL_TYPES:
        from transformers import AutoModelForUniversalSegmentation

        model = AutoModelForUniversalSegmentation.from_pretrained(config.model, ignore_mismatched_sizes=True, **labels)
    else:
        model = OffSegForSemanticSegmentation.from_pretrained(config.model, ignore_mismatched_sizes=True, **labels)
        if model.config.classifier != classifier:
            raise ValueError(
                f"{config.model} uses the {model.config.classifier!r} classifier but --classifier asks for "
                f"{config.classifier!r}; start from a preset (offseg-t/b/l) to train the other variant"
            )
    if is_mask_classification(model):
        _freeze_unused_swin_norm(model)
        if config.backbone_weights:
            _load_swin_backbone(model, config.backbone_weights)
        return model
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


def _mask2former_preset(name: str, classifier: str, labels: dict[str, Any]):
    """A randomly initialised Mask2Former-Swin-T of the reference configs (``mask2former_swin-t_8xb2-160k`` and its
    offset-learning twin; :func:`offseg_hf.models.mask2former_swin_config`)."""
    from transformers import Mask2FormerForUniversalSegmentation

    from offseg_hf import Mask2FormerOffsetForUniversalSegmentation, mask2former_swin_config

    offset = name.endswith("-offset")
    if classifier == "per-pixel":
        raise ValueError(f"--model {name} is Mask2Former, which classifies masks, not pixels: --classifier per-pixel "
                         "does not apply (mask2former-swin-t is the model without offset learning)")
    config = mask2former_swin_config("swin-t", offset_learning=offset, **labels)
    return (Mask2FormerOffsetForUniversalSegmentation if offset else Mask2FormerForUniversalSegmentation)(config)


def _freeze_unused_swin_norm(model) -> None:
    """transformers' ``SwinBackbone`` keeps its ``SwinModel``'s final LayerNorm, which its forward never uses (it
    normalises each stage with ``hidden_states_norms``): without a gradient it would stall DDP, so it is frozen."""
    encoder = model.model.pixel_level_module.encoder
    unused = getattr(getattr(encoder, "swin", None), "layernorm", None)
    if isinstance(unused, nn.Module):
        unused.requires_grad_(False)


def _load_swin_backbone(model, source: str) -> None:
    """Swin ImageNet weights (a ``SwinModel`` / ``SwinForImageClassification`` / ``SwinBackbone`` folder or Hub id of
    the same size) into Mask2Former's backbone; the per-stage output norms, absent from classification checkpoints,
    keep their fresh initialisation."""
    from transformers import SwinBackbone

    target = model.model.pixel_level_module.encoder
    try:
        backbone = SwinBackbone.from_pretrained(source, out_features=list(target.out_features))
        missing, unexpected = target.load_state_dict(backbone.state_dict(), strict=False)
    except (OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"--backbone-weights {source}: not Swin weights of the model's size ({error})") from error
    if missing or unexpected:
        raise ValueError(f"--backbone-weights {source}: Swin weights do not match (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")


def maybe_sync_batch_norm(model: nn.Module, num_processes: int, device_type: str) -> nn.Module:
    """Convert BatchNorm to SyncBatchNorm when training on several accelerator processes.

    PyTorch's SyncBatchNorm needs an accelerator; on CPU (gloo) the model keeps per-process BatchNorm
    and a warning says so.
    """
    if num_processes <= 1 or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model  # (Mask2Former has GroupNorm and LayerNorm only)
    if device_type == "cpu":
        logger.warning("several CPU processes: SyncBatchNorm needs an accelerator, keeping per-process BatchNorm")
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def load_datasets(config: DataArguments, seed: int = 0):
    """Train and validation datasets (canonical rows), plus class names; ``seed`` draws the synthetic scenes.

    Returns:
        ``(train, validation, class_names)``.
    """
    from offseg_hf.data.loading import load_segmentation_dataset

    if config.dataset == "synthetic":
        from offseg_hf.data.synthetic import synthetic_class_names

        common = {"num_labels": config.num_labels, "image_size": config.image_size, "seed": seed}
        train = load_segmentation_dataset("synthetic", "train", num_samples=config.train_samples, **common)
        validation = load_segmentation_dataset("synthetic", "validation", num_samples=config.eval_samples, **common)
        return train, validation, synthetic_class_names(config.num_labels)
    from offseg_hf.data.registry import get_dataset_info

    hub_kwargs = {}
    if config.hub_id:
        hub_kwargs = {"image_column": config.image_column, "label_column": config.label_column,
                      "label_format": config.label_format, "revision": config.dataset_revision}
    train = load_segmentation_dataset(config.dataset, "train", config.data_dir, config.hub_id, **hub_kwargs)
    validation = load_segmentation_dataset(config.dataset, "validation", config.data_dir, config.hub_id, **hub_kwargs)
    return train, validation, list(get_dataset_info(config.dataset).class_names)


def _limit(dataset, count: int | None):
    if count is None:
        return dataset
    if hasattr(dataset, "take") and not hasattr(dataset, "select"):
        return dataset.take(count)
    return dataset.select(range(min(count, len(dataset))))


def build_trainer(config: TrainConfig, quiet: bool = False):
    """The configured ``OffSegTrainer`` (model, data, optimiser, schedule, metrics, callbacks); ``quiet``: no
    per-step log lines.

    Returns:
        ``(trainer, processor)``.
    """
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback

    from offseg_hf.data.check import ensure_clean
    from offseg_hf.data.pipeline import ExampleTransform, SegmentationCollator, attach_transform
    from offseg_hf.data.transforms import build_test_transform, build_train_transform
    from offseg_hf.evaluation.evaluate import protocol_for
    from offseg_hf.inference.image_processing_offseg import build_image_processor
    from offseg_hf.evaluation.metrics import SegmentationMetricsForTrainer, preprocess_logits_for_metrics

    model_args, data, args = config
    train_raw, validation_raw, class_names = load_datasets(data, args.seed)
    # the dataset check (fast; a full one with --skip-bad-samples): bad files stop here, named, not mid-run
    train_raw = ensure_clean(train_raw, f"{data.dataset} train", skip_bad_samples=data.skip_bad_samples)
    validation_raw = ensure_clean(_limit(validation_raw, data.eval_max_samples), f"{data.dataset} validation",
                                  skip_bad_samples=data.skip_bad_samples)
    id2label = dict(enumerate(class_names))
    train_scale = tuple(data.train_scale) if data.train_scale else None
    test_scale = tuple(data.test_scale) if data.test_scale else None
    train_transform = ExampleTransform(
        build_train_transform(data.crop_size, train_scale, cat_max_ratio=data.cat_max_ratio,
                              photometric=data.photometric),
        seed=args.seed,
    )
    eval_transform = ExampleTransform(build_test_transform(test_scale))
    train_dataset = attach_transform(train_raw, train_transform)
    eval_dataset = attach_transform(validation_raw, eval_transform)

    set_seed(args.seed)  # same initial weights for the same seed, whatever ran before in this process
    model = build_model(model_args, id2label)
    # the world size and device of the arguments' own device setup: what the Trainer will use
    model = maybe_sync_batch_norm(model, args.world_size, args.device.type)
    # labels, loss and metrics agree on it (Mask2Former's config calls it ignore_value)
    ignore_index = getattr(model.config, "semantic_loss_ignore_index", None)
    ignore_index = model.config.ignore_value if ignore_index is None else ignore_index
    # the same processor as a converted folder of this dataset (keep-ratio test resize, normalisation, label reduction)
    processor = build_image_processor(data.dataset, scale=test_scale or protocol_for(data.dataset, data.image_size).scale,
                                      model_type=model.config.model_type)
    trainer_class, epoch_callback, time_budget, stop_on_interrupt = _trainer_classes()
    callbacks = [epoch_callback(train_transform), stop_on_interrupt()]
    if args.time_budget_s:
        callbacks.append(time_budget(args.time_budget_s))
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
    )
    if (args.fp16 or args.bf16) and not trainer.accelerator.native_amp:
        # accelerate then trains in float32 without a word; a user who asked for mixed precision should know
        raise ValueError(
            f"--{'fp16' if args.fp16 else 'bf16'} mixed precision is not available on this device "
            f"({trainer.accelerator.device}): accelerate runs float16 autocast only on GPUs (CUDA, XPU, NPU, MPS) "
            "and bfloat16 where torch supports it; use --bf16 on a CPU, or drop the flag to train in float32"
        )
    if quiet:
        trainer.remove_callback(PrinterCallback)
    return trainer, processor


def last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` folder in ``output_dir`` that verifies, or ``None`` when there is none;
    interrupted saves and corrupt or incomplete checkpoints are named (file and problem) in a warning and
    skipped (:func:`offseg_hf.training.checkpoints.newest_complete_checkpoint`).

    Raises:
        CheckpointError: there are checkpoints but none verifies (the message lists what was checked).
    """
    checkpoint, skipped = newest_complete_checkpoint(output_dir)
    for line in skipped:
        logger.warning("--resume: skipping %s", line)
    if checkpoint is None and any(Path(output_dir).glob("checkpoint-*")):
        raise CheckpointError(f"--resume: no checkpoint in {output_dir} verifies:\n  " + "\n  ".join(skipped)
                              + "\nremove the damaged folders to start afresh, or copy intact ones back")
    return checkpoint


class CheckpointError(Exception):
    """No checkpoint to resume from verifies, or the one given is damaged; the message names the files."""


class CheckpointSaveError(Exception):
    """A checkpoint could not be saved (too little space, or the write failed); nothing partial is left.

    Attributes: ``name`` (``checkpoint-N``), ``output_dir``, ``reason`` (the one-line cause), ``last_complete``
    (the newest checkpoint that verifies, set by :func:`train`)."""

    def __init__(self, name: str, output_dir: str, reason: str):
        self.name, self.output_dir, self.reason, self.last_complete = name, output_dir, reason, None
        super().__init__(f"saving {name} failed: {reason}")


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
        weights = sum(t.numel() * t.element_size() for t in trainer.model.state_dict().values())
        try:
            ensure_free_space(output_dir, weights + 2**20, "the final model")
        except OSError as error:
            raise CheckpointSaveError("the final model", output_dir, str(error)) from error
    try:
        trainer.save_model(str(staged))
    except Exception as error:
        shutil.rmtree(staged, ignore_errors=True)
        if not is_write_failure(error):
            raise
        raise CheckpointSaveError("the final model", output_dir, describe_write_error(error, staged)) from error
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


def write_synthetic_samples(config: DataArguments, folder: Path, count: int = 4, seed: int = 0) -> list[Path]:
    """Save the first ``count`` validation scenes (``val_000.png`` …) and their colour-coded ground truth
    (``val_000_gt.png``), so the quick-start has images to run ``offseg predict`` on."""
    import numpy as np
    from PIL import Image

    from offseg_hf.data.synthetic import SyntheticScenes, synthetic_palette

    folder.mkdir(parents=True, exist_ok=True)
    scenes = SyntheticScenes(config.num_labels, config.image_size, seed)
    palette = np.asarray(synthetic_palette(config.num_labels), dtype=np.uint8)
    paths = []
    for index in range(count):
        image, label = scenes.generate(index, "validation")
        path = folder / f"val_{index:03d}.png"
        Image.fromarray(image).save(path)
        Image.fromarray(palette[label]).save(folder / f"val_{index:03d}_gt.png")
        paths.append(path)
    return paths


def train(config: TrainConfig, quiet: bool = False) -> dict[str, Any]:
    """Run training (resuming from the newest complete checkpoint with ``--resume``, or from
    ``--resume-from-checkpoint``), evaluate, save, push.

    Writes to ``output_dir``: checkpoints, the final (best) model with its processor, ``train_config.json``
    (every option, flat: a valid ``--config`` file), ``run_info.json`` (world size, per-device and global batch
    the run used), ``eval_results.json``, ``log_history.json`` (losses, learning rates, evaluations) and, for the
    synthetic dataset, ``samples/`` (a few validation scenes and their ground truth). Every file and
    checkpoint folder appears only when complete (:mod:`offseg_hf.training.checkpoints`). Returns the final
    evaluation metrics.

    Raises:
        TrainingInterrupted: Ctrl-C / SIGTERM: the current step finished and a checkpoint was saved.
    """
    _, data, args = config
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    trainer, processor = build_trainer(config, quiet=quiet)
    if trainer.is_world_process_zero():
        atomic_write_text(Path(args.output_dir, "train_config.json"), config.to_json())
        run_info = {"world_size": trainer.accelerator.num_processes, "distributed_type": str(trainer.accelerator.distributed_type),
                    "device": str(args.device), "per_device_train_batch_size": trainer._train_batch_size,
                    "gradient_accumulation_steps": args.gradient_accumulation_steps,
                    "global_batch_size": trainer._train_batch_size * trainer.accelerator.num_processes
                    * args.gradient_accumulation_steps}
        atomic_write_text(Path(args.output_dir, "run_info.json"), json.dumps(run_info, indent=2))
    checkpoint = args.resume_from_checkpoint
    if checkpoint is None and args.resume:
        checkpoint = last_checkpoint(args.output_dir)
        if checkpoint is None:
            logger.warning("--resume: no complete checkpoint in %s, starting from scratch", args.output_dir)
    elif checkpoint is not None and (problems := checkpoint_problems(checkpoint)):
        raise CheckpointError(f"--resume-from-checkpoint {checkpoint} does not verify:\n  " + "\n  ".join(problems))
    if checkpoint is not None:
        logger.info("resuming from %s", checkpoint)
    if trainer.is_world_process_zero():
        for removed in discard_interrupted_saves(args.output_dir):  # they only take space
            logger.info("removed the interrupted save %s", removed)
    interrupt = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "StopOnInterrupt")
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except CheckpointSaveError as error:
        error.last_complete = newest_complete_checkpoint(args.output_dir)[0]
        raise
    if interrupt.signal_name is not None:
        saved = os.path.join(args.output_dir, f"checkpoint-{trainer.state.global_step}")
        raise TrainingInterrupted(interrupt.signal_name, trainer.state.global_step, saved if os.path.isdir(saved) else None)
    metrics = trainer.evaluate()
    try:
        _save_final_model(trainer, processor, args.output_dir)
    except CheckpointSaveError as error:
        error.last_complete = newest_complete_checkpoint(args.output_dir)[0]
        raise
    if trainer.is_world_process_zero():
        summary = {k: v for k, v in metrics.items() if not k.startswith("eval_IoU-")}
        atomic_write_text(Path(args.output_dir, "eval_results.json"), json.dumps(metrics, indent=2))
        atomic_write_text(Path(args.output_dir, "log_history.json"), json.dumps(trainer.state.log_history, indent=1))
        logger.info("final evaluation: %s", summary)
    if data.dataset == "synthetic" and trainer.is_world_process_zero():
        write_synthetic_samples(data, Path(args.output_dir) / "samples", seed=args.seed)
    if args.push_to_hub:
        trainer.push_to_hub(
            commit_message="OffSeg trained with offseg-hf",
            model_name=Path(args.hub_model_id or args.output_dir).name,
            dataset=data.dataset,
            tags=["offseg", "semantic-segmentation"],
        )
    return metrics
