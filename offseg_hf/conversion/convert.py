"""From the authors' checkpoints to Transformers folders and Hub repos: one flow for every kind of checkpoint.

:func:`convert_any_checkpoint` (``offseg convert``) reads the file once (:mod:`~offseg_hf.conversion.reading`:
safetensors or ``weights_only=True``), detects what it holds (:data:`CHECKPOINT_KINDS`: OffSeg, SegFormer + offset
learning, SegNeXt ± offset learning, Mask2Former ± offset learning (Swin), EfficientFormerV2 ImageNet in the authors'
or timm's layout, MSCAN ImageNet)
and dispatches to that kind's converter:

* :func:`convert_checkpoint`: OffSeg → a folder with ``config.json`` (the dataset's real ``id2label``),
  ``model.safetensors``, ``preprocessor_config.json`` (the paper's test-time pipeline of that dataset) and
  ``README.md`` (model card);
* :func:`convert_segformer_offset_checkpoint`, :func:`convert_segnext_checkpoint`,
  :func:`convert_mask2former_checkpoint`: the same for those models (Mask2Former: its own image processor and card);
* :func:`convert_backbone_checkpoint`, :func:`convert_mscan_checkpoint`: ImageNet backbones to start training from.

Each converter maps the keys with its declarative rules (:mod:`~offseg_hf.conversion.keymaps`,
:mod:`~offseg_hf.conversion.segformer`, :mod:`~offseg_hf.conversion.segnext`,
:mod:`~offseg_hf.conversion.mask2former`, :mod:`~offseg_hf.conversion.efficientformer_v2`), accounts for every key
(:func:`~offseg_hf.conversion.accounting.account_for_keys`), and ends the same way (:func:`_finish`): the folder is
written to a temporary sibling and renamed into place (a failure leaves nothing behind), optionally reloaded and
compared (weights and logits), then optionally uploaded. Every failure is a
:class:`~offseg_hf.conversion.accounting.ConversionError` (or ``FileNotFoundError``) naming the culprit.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import HfApi
from transformers import AutoImageProcessor

from offseg_hf.conversion.accounting import ConversionError
from offseg_hf.conversion.efficientformer_v2 import (
    ATTENTION_BIAS_POLICIES,
    BackboneLoadReport,
    detect_backbone_variant,
    imagenet_to_reference_backbone,
    is_imagenet_backbone_checkpoint,
    load_imagenet_backbone_weights,
    transfer_attention_biases,
)
from offseg_hf.conversion.keymaps import classifier_of, convert_official_state_dict, detect_preset, is_dropped, num_labels_of
from offseg_hf.conversion.mask2former import (
    convert_mask2former_state_dict,
    is_mask2former_state_dict,
    mask2former_config_from_state_dict,
    model_class_for,
)
from offseg_hf.conversion.mask2former import preset_name as mask2former_preset_name
from offseg_hf.conversion.model_cards import render_backbone_card, render_mask2former_card, render_model_card
from offseg_hf.conversion.reading import read_checkpoint
from offseg_hf.conversion.segformer import (
    convert_segformer_offset_state_dict,
    is_segformer_offset_state_dict,
    segformer_offset_config_from_state_dict,
)
from offseg_hf.conversion.segnext import (
    convert_mscan_state_dict,
    convert_segnext_state_dict,
    detect_mscan_variant,
    is_mscan_backbone_state_dict,
    is_segnext_state_dict,
    preset_name,
    segnext_config_from_state_dict,
)
from offseg_hf.data.registry import DATASET_NAMES, get_dataset_info, identify_dataset
from offseg_hf.data.tables import DatasetInfo
from offseg_hf.inference.image_processing_offseg import build_image_processor
from offseg_hf.models.configuration_offseg import EfficientFormerV2Config, OffSegConfig
from offseg_hf.models.modeling_efficientformer_v2 import EfficientFormerV2Backbone
from offseg_hf.models.modeling_offseg import OffSegForSemanticSegmentation
from offseg_hf.models.modeling_segformer_offset import SegformerOffsetForSemanticSegmentation
from offseg_hf.models.modeling_segnext import MscanBackbone, SegNextForSemanticSegmentation

logger = logging.getLogger(__name__)

__all__ = [
    "ATTENTION_BIAS_POLICIES",
    "CHECKPOINT_KINDS",
    "BackboneConversionResult",
    "BackboneLoadReport",
    "CheckpointKind",
    "ConversionError",
    "ConversionResult",
    "convert_any_checkpoint",
    "convert_backbone_checkpoint",
    "convert_checkpoint",
    "convert_mask2former_checkpoint",
    "convert_mscan_checkpoint",
    "convert_segformer_offset_checkpoint",
    "convert_segnext_checkpoint",
    "detect_backbone_variant",
    "detect_checkpoint_kind",
    "imagenet_to_reference_backbone",
    "is_imagenet_backbone_checkpoint",
    "load_imagenet_backbone_weights",
    "push_folder_to_hub",
    "read_checkpoint",
    "resolve_dataset",
    "transfer_attention_biases",
]


@dataclass
class ConversionResult:
    """What :func:`convert_checkpoint` produced."""

    output_dir: Path
    preset: str
    dataset: str
    num_labels: int
    num_parameters: int
    verification: dict[str, float] | None = None
    hub_url: str | None = None
    dropped_keys: list[str] = field(default_factory=list)


@dataclass
class BackboneConversionResult:
    """What :func:`convert_backbone_checkpoint` produced."""

    output_dir: Path
    variant: str
    layout: str
    attention_biases: str
    num_parameters: int
    dropped_keys: list[str]
    hub_url: str | None = None
    architecture: str = "EfficientFormerV2"

# --------------------------------------------------------------------------------------------------
# What the checkpoint is
# --------------------------------------------------------------------------------------------------


def _looks_like(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A short guess of which architecture a state dict belongs to, for error messages."""
    keys = list(state_dict)
    if any(k.startswith("sem_seg_head.") for k in keys):
        return ("a detectron2 (facebookresearch) MaskFormer / Mask2Former checkpoint; `offseg convert` reads "
                "mmsegmentation's layout of Mask2Former ('backbone.*', 'decode_head.*')")
    if any(k.startswith("backbone.layers.") for k in keys) and any("linear_fuse" in k or "fusion_conv" in k for k in keys):
        return "SegFormer (MiT backbone)"
    if any(k.startswith(("network.", "patch_embed.", "stem.", "stages.")) for k in keys) and "head.weight" in keys:
        return "an EfficientFormerV2 ImageNet classifier"
    if any(k.startswith("backbone.") for k in keys):
        return "another mmsegmentation model"
    return "an unknown model"


def _check_offseg_keys(state_dict: Mapping[str, torch.Tensor]) -> None:
    required = ("backbone.patch_embed.0.weight", "backbone.network.0.0.mlp.fc1.weight")
    missing = [key for key in required if key not in state_dict]
    classifiers = ("decode_head.offset_learning.cls_repr", "decode_head.conv_seg.weight")
    if not any(key in state_dict for key in classifiers):
        missing.append(" or ".join(classifiers))
    if missing:
        hint = ""
        if _looks_like(state_dict) == "an EfficientFormerV2 ImageNet classifier":
            hint = (
                "; convert ImageNet backbone checkpoints with convert_backbone_checkpoint (`offseg convert` picks it "
                "automatically) or load them with load_imagenet_backbone_weights"
            )
        example = ", ".join(repr(k) for k in list(state_dict)[:3])
        raise ConversionError(
            f"not an OffSeg checkpoint (EfficientFormerV2 backbone + OffSeg head): it lacks {missing}; "
            f"it looks like {_looks_like(state_dict)} (first keys: {example}){hint}"
        )


def resolve_dataset(num_labels: int, dataset: str | None = None, meta: Mapping | None = None) -> DatasetInfo:
    """The benchmark a checkpoint with ``num_labels`` classes was trained on.

    ``dataset`` (a name or alias) wins and must agree with ``num_labels``; otherwise the class names in
    ``meta["dataset_meta"]["classes"]`` (mmengine checkpoints store them) or the class count decide
    (:func:`offseg_hf.data.registry.identify_dataset`).

    Raises:
        ConversionError: ``dataset`` disagrees with ``num_labels``, or no benchmark has ``num_labels`` classes.
    """
    if dataset is not None:
        try:
            info = get_dataset_info(dataset)
        except ValueError as error:
            raise ConversionError(str(error)) from None
        if info.num_labels != num_labels:
            raise ConversionError(
                f"the checkpoint has {num_labels} classes (decode_head.offset_learning.cls_repr) but dataset "
                f"{info.name!r} has {info.num_labels}; pass the dataset the checkpoint was trained on"
            )
        return info
    classes = ((meta or {}).get("dataset_meta") or {}).get("classes")
    names = tuple(str(name).strip() for name in classes) if classes else None
    found, by_names = identify_dataset(names, num_labels)
    if found == "synthetic":  # not a benchmark: only the class count can name one
        found, by_names = identify_dataset(None, num_labels)
    if found is None:
        known = ", ".join(f"{n} ({get_dataset_info(n).num_labels})" for n in DATASET_NAMES)
        raise ConversionError(
            f"the checkpoint has {num_labels} classes (decode_head.offset_learning.cls_repr), which matches none of "
            f"the OffSeg benchmarks: {known}"
        )
    info = get_dataset_info(found)
    if names and not by_names:
        differences = [(i, a, b) for i, (a, b) in enumerate(zip(names, info.class_names)) if a != b]
        logger.warning(
            "the checkpoint's meta lists %d class names that differ from %s's (first differences, as index: "
            "checkpoint vs table: %s); using %s's names because the class count matches. Pass dataset= (--dataset) "
            "to confirm, or convert with your own id2label.",
            len(names), info.name, ", ".join(f"{i}: {a!r} vs {b!r}" for i, a, b in differences[:3]) or "count differs",
            info.name,
        )
    return info

# --------------------------------------------------------------------------------------------------
# The common end: write atomically, verify, push
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def _verify_folder(folder: Path, mapped: Mapping[str, torch.Tensor], reference_model, size: int) -> dict[str, float]:
    """Reload ``folder`` and compare it with the original tensors (through the mapping) and outputs.

    * every tensor in ``model.safetensors`` equals the original tensor it was mapped from;
    * the reloaded model and ``reference_model`` (built in memory from the original tensors) give the
      same logits (Mask2Former: class and mask logits of the last stage) on a fixed input
      ``randn(1, 3, size, size)`` (generator seed 0).
    """
    reloaded = type(reference_model).from_pretrained(folder).eval()
    saved = reloaded.state_dict()
    weight_diff = 0.0
    for key, value in mapped.items():
        if key not in saved:
            raise ConversionError(f"verify: {folder / 'model.safetensors'} lacks {key!r}")
        if saved[key].shape != value.shape:
            raise ConversionError(f"verify: {key!r} saved with shape {tuple(saved[key].shape)}, original {tuple(value.shape)}")
        weight_diff = max(weight_diff, (saved[key].double() - value.double()).abs().max().item() if value.numel() else 0.0)
    pixel_values = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    expected, outputs = _output_logits(reference_model(pixel_values)), _output_logits(reloaded(pixel_values))
    if not all(torch.isfinite(logits).all() for logits in outputs):
        raise ConversionError("verify: the converted model produces non-finite logits")
    logits_diff = max((ours - theirs).abs().max().item() for ours, theirs in zip(outputs, expected))
    logits = torch.cat([logits.flatten() for logits in outputs])
    if weight_diff != 0.0 or logits_diff > 1e-5:
        raise ConversionError(
            f"verify failed: max |saved - original| weight difference {weight_diff:.3g}, logits difference {logits_diff:.3g}"
        )
    AutoImageProcessor.from_pretrained(folder)  # the processor config must load as well
    return {"max_weight_diff": weight_diff, "max_logits_diff": logits_diff, "logits_std": logits.std().item()}


def _output_logits(outputs) -> tuple[torch.Tensor, ...]:
    """The logits of a segmentation output: ``logits``, or Mask2Former's class and mask logits."""
    if getattr(outputs, "logits", None) is not None:
        return (outputs.logits,)
    return outputs.class_queries_logits, outputs.masks_queries_logits


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not (output_dir.is_dir() and not any(output_dir.iterdir())) and not overwrite:
        raise ConversionError(f"output folder {output_dir} already exists and is not empty; pass overwrite=True (--overwrite)")


def _write_atomically(output_dir: Path, overwrite: bool, write) -> None:
    """Run ``write(staging)`` in a fresh sibling folder of ``output_dir``, then rename it into place.

    On any failure the staging folder, and parent folders created for ``output_dir``, are removed.
    """
    parent = output_dir.resolve().parent
    created_parents = [p for p in [parent, *parent.parents] if not p.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=parent))
    try:
        write(staging)
        _move_into_place(staging, output_dir, overwrite)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        for created in created_parents:  # innermost first
            try:
                created.rmdir()
            except OSError:
                break
        from offseg_hf.training.checkpoints import describe_write_error, is_write_failure

        if is_write_failure(error):  # a full or failing disk, said in words
            raise ConversionError(describe_write_error(error, output_dir)) from error
        raise


def _move_into_place(staging: Path, output_dir: Path, overwrite: bool) -> None:
    """Rename the finished ``staging`` folder to ``output_dir`` (replacing it if ``overwrite``)."""
    if output_dir.exists():
        if output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()
        elif overwrite:
            old = output_dir.with_name(f".{output_dir.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(output_dir, old)
            os.replace(staging, output_dir)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
            return
        else:
            raise ConversionError(f"output folder {output_dir} appeared while converting; not overwriting it")
    os.replace(staging, output_dir)


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload OffSeg model",
) -> str:
    """Create (if needed) the model repo ``repo_id`` and upload every file of ``folder`` in one commit.

    The token comes from ``token``, else the usual places (``HF_TOKEN``, ``huggingface-cli login``); the
    endpoint from ``HF_ENDPOINT``. Returns the URL of the commit.
    """
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=commit_message)
    return str(getattr(commit, "commit_url", commit))


def _finish(result, output_dir: Path, overwrite: bool, write_files: Callable[[Path], None], *, verify_with=None,
            push_to_hub: str | None, private: bool, token: str | None, commit_message: str):
    """The end of every conversion: ``write_files(staging)`` into a fresh sibling folder, then (``verify_with =
    (mapped, model, size)``) :func:`_verify_folder` on it, then the rename into place; then the upload."""

    def write(staging: Path) -> None:
        write_files(staging)
        if verify_with is not None:
            result.verification = _verify_folder(staging, *verify_with)

    _write_atomically(output_dir, overwrite, write)
    if push_to_hub:
        result.hub_url = push_folder_to_hub(output_dir, push_to_hub, private=private, token=token,
                                            commit_message=commit_message)
    return result


def _segmentation_files(model, processor, card: Callable[[], str] | None = None) -> Callable[[Path], None]:
    """What a segmentation folder holds: the model, the dataset's processor and (OffSeg, Mask2Former) the card."""

    def write(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        if card is not None:
            (staging / "README.md").write_text(card(), encoding="utf-8")

    return write


def _num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# One converter per kind
# --------------------------------------------------------------------------------------------------


_SEGMENTATION_OPTIONS = """
    Args:
        checkpoint: the authors' ``.pth`` (or a ``.safetensors`` with the same keys).
        output_dir: the folder to create, e.g. ``offseg-t-ade20k``. Must not exist (or be empty) unless
            ``overwrite``.
        dataset: benchmark name (``ade20k``, ``coco-stuff``, ``cityscapes``, ``pascal-context`` or an
            alias); default: decided from the checkpoint's class names (meta) or class count.
        verify: reload the written folder and compare weights and logits with the original tensors.
        verify_size: side of the square random input used by ``verify``.
        overwrite: replace an existing ``output_dir``.
        push_to_hub: upload the finished folder to this Hub repo id.
        private: create the Hub repo private.
        token: Hub token (default: ``HF_TOKEN`` / the cached login).

    Raises:
        FileNotFoundError, ConversionError: nothing is written.
"""


@dataclass
class _Converted:
    """What a segmentation builder makes of a state dict: the model (weights not loaded yet) and its weights,
    optionally its image processor (default: :func:`build_image_processor` of the dataset) and its model card
    (``card(model_id=, num_parameters=, source_checkpoint=)``; default: none)."""

    model: torch.nn.Module
    weights: dict[str, torch.Tensor]
    info: DatasetInfo
    preset: str
    description: str
    dropped: list[str]
    processor: object | None = None
    card: Callable[..., str] | None = None


def _convert_segmentation(
    build: Callable[[Mapping[str, torch.Tensor], Mapping, str | None], _Converted],
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    dataset: str | None = None,
    verify: bool = False,
    verify_size: int = 512,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    token: str | None = None,
    model_id: str | None = None,
    _loaded: tuple[dict[str, torch.Tensor], dict] | None = None,
) -> ConversionResult:
    """The flow of every segmentation checkpoint: read, ``build`` (map and account for the keys), load strictly,
    then write the model, the dataset's processor and (OffSeg) the card, verify and push (:func:`_finish`)."""
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    _check_output_dir(output_dir, overwrite)
    state_dict, meta = _loaded if _loaded is not None else read_checkpoint(checkpoint)
    try:
        converted = build(state_dict, meta, dataset)
    except ConversionError as error:
        raise ConversionError(f"{checkpoint}: {error}") from None
    model, info = converted.model.eval(), converted.info
    model.load_state_dict(converted.weights, strict=True)
    num_parameters = _num_parameters(model)
    result = ConversionResult(
        output_dir, converted.preset, info.name, info.num_labels, num_parameters, dropped_keys=sorted(converted.dropped)
    )
    card = None
    if converted.card is not None:
        card = lambda: converted.card(  # noqa: E731
            model_id=model_id or push_to_hub or output_dir.name, num_parameters=num_parameters,
            source_checkpoint=checkpoint.name,
        )
    processor = converted.processor if converted.processor is not None else build_image_processor(info.name)
    return _finish(
        result, output_dir, overwrite, _segmentation_files(model, processor, card),
        verify_with=(converted.weights, model, verify_size) if verify else None, push_to_hub=push_to_hub,
        private=private, token=token,
        commit_message=f"Add {converted.description} ({info.name}) converted from {checkpoint.name}",
    )


def _build_offseg(state_dict: Mapping[str, torch.Tensor], meta: Mapping, dataset: str | None) -> _Converted:
    _check_offseg_keys(state_dict)
    preset = detect_preset(state_dict)
    info = resolve_dataset(num_labels_of(state_dict), dataset, meta)
    config = OffSegConfig.from_preset(
        preset, num_labels=info.num_labels, id2label=info.id2label, label2id=info.label2id,
        classifier=classifier_of(state_dict),
    )
    model = OffSegForSemanticSegmentation(config)
    try:  # every key mapped, dropped by design or derived (and then checked); every model key provided
        weights = convert_official_state_dict(
            state_dict, config, expected_shapes={key: value.shape for key, value in model.state_dict().items()}
        )
    except ConversionError as error:
        raise ConversionError(f"({preset}, {info.name}) {error}") from None
    dropped = [key for key in state_dict if is_dropped(key, config.classifier)]
    card = lambda **facts: render_model_card(preset, info.name, **facts)  # noqa: E731
    return _Converted(model, weights, info, preset, preset, dropped, card=card)


def _build_segformer_offset(state_dict: Mapping[str, torch.Tensor], meta: Mapping, dataset: str | None) -> _Converted:
    info = resolve_dataset(int(state_dict["decode_head.offset_learning.cls_repr"].shape[-2]), dataset, meta)
    config = segformer_offset_config_from_state_dict(state_dict, id2label=info.id2label, label2id=info.label2id)
    config, weights = convert_segformer_offset_state_dict(state_dict, config)
    dropped = [key for key in state_dict if key.startswith("decode_head.conv_seg.")]
    return _Converted(SegformerOffsetForSemanticSegmentation(config), weights, info, "segformer-offset",
                      "SegFormer + offset learning", dropped)


def _build_segnext(state_dict: Mapping[str, torch.Tensor], meta: Mapping, dataset: str | None) -> _Converted:
    info = resolve_dataset(segnext_config_from_state_dict(state_dict).num_labels, dataset, meta)
    config = segnext_config_from_state_dict(state_dict, id2label=info.id2label, label2id=info.label2id)
    config, weights, dropped = convert_segnext_state_dict(state_dict, config)
    preset = preset_name(config)
    description = f"SegNeXt-{preset.split('-')[1].upper()}" + (" w/ offset learning" if config.classifier == "offset_learning" else "")
    return _Converted(SegNextForSemanticSegmentation(config), weights, info, preset, description, dropped)


def _build_mask2former(state_dict: Mapping[str, torch.Tensor], meta: Mapping, dataset: str | None) -> _Converted:
    info = resolve_dataset(mask2former_config_from_state_dict(state_dict).num_labels, dataset, meta)
    config = mask2former_config_from_state_dict(state_dict, id2label=info.id2label, label2id=info.label2id)
    config, weights, dropped = convert_mask2former_state_dict(state_dict, config)
    preset = mask2former_preset_name(config)
    description = f"Mask2Former ({preset.removeprefix('mask2former-').removesuffix('-offset')})" + (
        " w/ offset learning" if config.model_type == "mask2former_offset" else ""
    )
    card = lambda **facts: render_mask2former_card(config, info.name, **facts)  # noqa: E731
    return _Converted(model_class_for(config)(config), weights, info, preset, description, dropped,
                      processor=build_image_processor(info.name, model_type=config.model_type), card=card)


def convert_checkpoint(checkpoint: str | os.PathLike, output_dir: str | os.PathLike, **options) -> ConversionResult:
    """Convert an official OffSeg checkpoint into a Transformers folder (and optionally a Hub repo), with its model
    card (``model_id``: the name its usage snippets use; default ``push_to_hub`` or the folder name).
    """
    return _convert_segmentation(_build_offseg, checkpoint, output_dir, **options)


def convert_segformer_offset_checkpoint(checkpoint: str | os.PathLike, output_dir: str | os.PathLike, **options) -> ConversionResult:
    """Convert an official "SegFormer w/ Offset Learning" checkpoint into a Transformers folder
    (``model_type: segformer_offset``); every reference key is mapped or explicitly dropped
    (:func:`offseg_hf.conversion.segformer.convert_segformer_offset_state_dict`).
    """
    return _convert_segmentation(_build_segformer_offset, checkpoint, output_dir, **options)


def convert_segnext_checkpoint(checkpoint: str | os.PathLike, output_dir: str | os.PathLike, **options) -> ConversionResult:
    """Convert an official SegNeXt checkpoint, plain (mmsegmentation) or "w/ Offset Learning" (the OffSeg
    authors'), into a :class:`~offseg_hf.models.modeling_segnext.SegNextForSemanticSegmentation` folder: the size
    (T/S/B/L), the classifier and the dataset are read from the checkpoint; every key is mapped or explicitly
    dropped (:func:`offseg_hf.conversion.segnext.convert_segnext_state_dict`).
    """
    return _convert_segmentation(_build_segnext, checkpoint, output_dir, **options)


def convert_mask2former_checkpoint(checkpoint: str | os.PathLike, output_dir: str | os.PathLike, **options) -> ConversionResult:
    """Convert an official Mask2Former checkpoint, plain (mmsegmentation) or "w/ Offset Learning" (the OffSeg
    authors'), on a Swin backbone of any size, into a transformers ``Mask2FormerForUniversalSegmentation`` /
    :class:`~offseg_hf.models.modeling_mask2former_offset.Mask2FormerOffsetForUniversalSegmentation` folder with
    the reference test pipeline's image processor and a model card; every key is mapped, checked and dropped, or
    provided by the model (:func:`offseg_hf.conversion.mask2former.convert_mask2former_state_dict`). A backbone
    other than Swin or a head other than Mask2Former is refused before anything is written.
    """
    return _convert_segmentation(_build_mask2former, checkpoint, output_dir, **options)


for _converter in (convert_checkpoint, convert_segformer_offset_checkpoint, convert_segnext_checkpoint,
                   convert_mask2former_checkpoint):
    _converter.__doc__ += _SEGMENTATION_OPTIONS


def convert_backbone_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    attention_biases: str = "zero",
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    token: str | None = None,
    _loaded: tuple[dict[str, torch.Tensor], dict] | None = None,
) -> BackboneConversionResult:
    """Convert an EfficientFormerV2 ImageNet checkpoint into an :class:`EfficientFormerV2Backbone` folder.

    The folder (``config.json``, ``model.safetensors``, ``README.md``) loads with
    ``EfficientFormerV2Backbone.from_pretrained`` (and, from the Hub, ``AutoBackbone.from_pretrained``;
    transformers 5.24's ``AutoBackbone`` rejects local paths); its state dict drops into
    ``OffSegForSemanticSegmentation.offseg.backbone``. See :func:`load_imagenet_backbone_weights` for
    ``attention_biases`` and what is dropped.
    """
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    _check_output_dir(output_dir, overwrite)
    state_dict, _ = _loaded if _loaded is not None else read_checkpoint(checkpoint)
    variant = detect_backbone_variant(state_dict)
    # A segmentation backbone to start OffSeg training from: all four stages out.
    config = EfficientFormerV2Config.from_variant(variant, out_features=["stage1", "stage2", "stage3", "stage4"])
    backbone = EfficientFormerV2Backbone(config).eval()
    try:
        report = load_imagenet_backbone_weights(backbone, state_dict, attention_biases=attention_biases)
    except ConversionError as error:
        raise ConversionError(f"{checkpoint}: {error}") from None
    num_parameters = _num_parameters(backbone)
    result = BackboneConversionResult(output_dir, variant, report.layout, attention_biases, num_parameters, report.dropped)

    def write(staging: Path) -> None:
        backbone.save_pretrained(staging, safe_serialization=True)
        card = render_backbone_card(
            variant, model_id=push_to_hub or output_dir.name, num_parameters=num_parameters,
            source_checkpoint=checkpoint.name, attention_biases=attention_biases,
        )
        (staging / "README.md").write_text(card, encoding="utf-8")

    return _finish(
        result, output_dir, overwrite, write, push_to_hub=push_to_hub, private=private, token=token,
        commit_message=f"Add EfficientFormerV2-{variant.upper()} backbone converted from {checkpoint.name}",
    )


def convert_mscan_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    token: str | None = None,
    _loaded: tuple[dict[str, torch.Tensor], dict] | None = None,
) -> BackboneConversionResult:
    """Convert an MSCAN ImageNet checkpoint (``mscan_t/s/b/l``, mmsegmentation's SegNeXt pretraining files) into
    an :class:`~offseg_hf.models.modeling_segnext.MscanBackbone` folder returning stages 2–4, the start of SegNeXt
    training. The ImageNet classifier (``head.*``) is dropped; every other key is mapped strictly.
    """
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    _check_output_dir(output_dir, overwrite)
    state_dict, _ = _loaded if _loaded is not None else read_checkpoint(checkpoint)
    try:
        variant = detect_mscan_variant({k.removeprefix("backbone."): v for k, v in state_dict.items()})
        config, converted, dropped = convert_mscan_state_dict(state_dict)
    except ConversionError as error:
        raise ConversionError(f"{checkpoint}: {error}") from None
    backbone = MscanBackbone(config).eval()
    backbone.load_state_dict(converted, strict=True)
    result = BackboneConversionResult(
        output_dir, variant, "mmsegmentation", "none (MSCAN has none)", _num_parameters(backbone), sorted(dropped),
        architecture="MSCAN",
    )
    return _finish(
        result, output_dir, overwrite, lambda staging: backbone.save_pretrained(staging, safe_serialization=True),
        push_to_hub=push_to_hub, private=private, token=token,
        commit_message=f"Add MSCAN-{variant.upper()} backbone converted from {checkpoint.name}",
    )


# --------------------------------------------------------------------------------------------------
# Detect and dispatch
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointKind:
    """A kind of checkpoint :func:`convert_any_checkpoint` recognises: how to tell it, how to convert it, and
    which of the kind-specific options (:data:`_OPTION_DEFAULTS`) its converter takes."""

    name: str
    detect: Callable[[Mapping[str, torch.Tensor]], bool]
    convert: Callable
    options: tuple[str, ...]


# First match wins; OffSeg last, whose converter names what a non-OffSeg file looks like.
CHECKPOINT_KINDS: tuple[CheckpointKind, ...] = (
    CheckpointKind("SegNeXt", is_segnext_state_dict, convert_segnext_checkpoint, ("dataset", "verify", "verify_size")),
    CheckpointKind("MSCAN ImageNet backbone", is_mscan_backbone_state_dict, convert_mscan_checkpoint, ()),
    CheckpointKind("EfficientFormerV2 ImageNet", is_imagenet_backbone_checkpoint, convert_backbone_checkpoint,
                   ("attention_biases",)),
    CheckpointKind("SegFormer + offset learning", is_segformer_offset_state_dict, convert_segformer_offset_checkpoint,
                   ("dataset", "verify", "verify_size")),
    CheckpointKind("Mask2Former (Swin)", is_mask2former_state_dict, convert_mask2former_checkpoint,
                   ("dataset", "verify", "verify_size", "model_id")),
    CheckpointKind("OffSeg", lambda state_dict: True, convert_checkpoint, ("dataset", "verify", "verify_size", "model_id")),
)
_COMMON_OPTIONS = {"overwrite", "push_to_hub", "private", "token"}
_OPTION_DEFAULTS = {"dataset": None, "verify": False, "verify_size": 512, "model_id": None, "attention_biases": "zero"}


def detect_checkpoint_kind(state_dict: Mapping[str, torch.Tensor]) -> CheckpointKind:
    """The first of :data:`CHECKPOINT_KINDS` whose detector accepts ``state_dict``."""
    return next(kind for kind in CHECKPOINT_KINDS if kind.detect(state_dict))


def convert_any_checkpoint(checkpoint: str | os.PathLike, output_dir: str | os.PathLike, **options):
    """Convert whatever ``checkpoint`` holds (:func:`detect_checkpoint_kind`; the file is read once).

    ``options``: ``overwrite``, ``push_to_hub``, ``private``, ``token`` (every kind) and the kind-specific
    ``dataset``, ``verify``, ``verify_size``, ``model_id``, ``attention_biases``; a kind-specific one set to a
    non-default value for a kind whose converter does not take it raises :class:`ConversionError` naming the kinds
    it applies to.
    """
    unknown = sorted(set(options) - set(_OPTION_DEFAULTS) - _COMMON_OPTIONS)
    if unknown:
        raise TypeError(f"convert_any_checkpoint() got unexpected options {unknown}; known: "
                        f"{sorted({*_OPTION_DEFAULTS, *_COMMON_OPTIONS})}")
    loaded = read_checkpoint(checkpoint)
    kind = detect_checkpoint_kind(loaded[0])
    misplaced = sorted(k for k, v in options.items()
                       if k in _OPTION_DEFAULTS and k not in kind.options and v not in (None, _OPTION_DEFAULTS[k]))
    if misplaced:
        takers = ", ".join(other.name for other in CHECKPOINT_KINDS if set(misplaced) <= set(other.options))
        raise ConversionError(f"{checkpoint} is a(n) {kind.name} checkpoint; {misplaced} apply to {takers} checkpoints only")
    accepted = {k: v for k, v in options.items() if k in _COMMON_OPTIONS or k in kind.options}
    return kind.convert(checkpoint, output_dir, _loaded=loaded, **accepted)
