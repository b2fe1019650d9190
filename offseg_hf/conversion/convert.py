"""From the authors' checkpoints to Transformers folders and Hub repos.

Two entry points:

* :func:`convert_checkpoint`: an official OffSeg checkpoint (mmsegmentation ``.pth``: a dict with
  ``state_dict`` and ``meta``) → a folder with ``config.json`` (the dataset's real ``id2label``),
  ``model.safetensors``, ``preprocessor_config.json`` (the paper's test-time pipeline of that dataset)
  and ``README.md`` (model card), optionally verified and pushed to the Hub. The folder is written to a
  temporary sibling directory and renamed at the end, so a failure leaves nothing behind.
* :func:`load_imagenet_backbone_weights`: an EfficientFormerV2 ImageNet checkpoint (the authors'
  ``eformer_s1_450.pth`` etc., a dict with ``model``, or a timm ``efficientformerv2_*`` state dict) →
  :class:`~offseg_hf.models.modeling_efficientformer_v2.EfficientFormerV2Backbone`, the starting point of
  OffSeg training in the paper; :func:`convert_backbone_checkpoint` writes such a backbone as a
  Transformers folder. :func:`convert_any_checkpoint` (``offseg convert``) picks the right one.

The key renaming itself lives in :mod:`offseg_hf.conversion.keymaps`; this module reads files, decides variant and
dataset, accounts for every key, writes, verifies and uploads.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from offseg_hf.data.tables import DATASET_NAMES, DatasetInfo, dataset_for_num_labels, get_dataset_info
from offseg_hf.inference.image_processing_offseg import build_image_processor

logger = logging.getLogger(__name__)

__all__ = [
    "ATTENTION_BIAS_POLICIES",
    "BackboneConversionResult",
    "BackboneLoadReport",
    "ConversionError",
    "ConversionResult",
    "convert_any_checkpoint",
    "convert_backbone_checkpoint",
    "convert_checkpoint",
    "convert_mscan_checkpoint",
    "convert_segnext_checkpoint",
    "detect_backbone_variant",
    "imagenet_to_reference_backbone",
    "is_imagenet_backbone_checkpoint",
    "load_imagenet_backbone_weights",
    "push_folder_to_hub",
    "read_checkpoint",
    "resolve_dataset",
    "transfer_attention_biases",
]


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the file, key or shape at fault."""


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


# --------------------------------------------------------------------------------------------------
# Reading checkpoints
# --------------------------------------------------------------------------------------------------


class _InertObject:
    """Base of the stand-ins :func:`read_checkpoint` builds for non-tensor Python objects in a checkpoint."""


def _inert_class(qualified_name: str) -> type:
    """An inert class named like ``qualified_name``: constructing or restoring it runs nothing from the file."""
    module, _, name = qualified_name.rpartition(".")

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    return type(
        name,
        (_InertObject,),
        {
            "__module__": module,
            "__qualname__": name,
            "__new__": __new__,
            "__init__": lambda self, *args, **kwargs: None,
            "__setstate__": lambda self, state: None,
            "__repr__": lambda self: f"<{qualified_name} (not read)>",
        },
    )


def _load_with_inert_objects(path: Path, first_error: Exception):
    """Second ``weights_only=True`` attempt for checkpoints that also pickle bookkeeping objects.

    mmengine checkpoints carry e.g. ``message_hub`` (``HistoryBuffer`` objects holding numpy arrays) next to
    ``state_dict``. The globals those objects need are answered with inert stand-ins (allow-listed via
    ``torch.serialization.safe_globals``), so the unpickler stays restricted and no code from the file runs;
    the stand-ins are dropped afterwards and only tensors are used.
    """
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        with torch.serialization.safe_globals([_inert_class(name) for name in names]):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise ConversionError(
            f"{path} holds Python objects besides tensors that torch.load(weights_only=True) refuses to unpickle "
            f"({first_error}; {error}). Only if you trust the file, keep just its weights in a trusted environment and "
            "convert that file:\n"
            f"  python -c \"import torch; c = torch.load('{path}', map_location='cpu', weights_only=False); "
            f"torch.save({{'state_dict': c['state_dict'], 'meta': {{}}}}, '{path.with_suffix('')}-weights.pth')\""
        ) from error
    logger.info("%s: ignored non-tensor objects of types %s (not needed for the weights)", path, ", ".join(names))
    return payload


def _without_inert(value):
    """``value`` with inert stand-ins removed (dicts, lists, tuples walked)."""
    if isinstance(value, _InertObject):
        return None
    if isinstance(value, Mapping):
        return {k: _without_inert(v) for k, v in value.items() if not isinstance(v, _InertObject)}
    if isinstance(value, (list, tuple)):
        return type(value)(_without_inert(v) for v in value if not isinstance(v, _InertObject))
    return value


def _identify_pytorch_file(path: Path) -> None:
    """Raise unless ``path`` looks like a file ``torch.save`` wrote: a complete zip archive with a ``data.pkl``
    record, or a legacy (pre-1.6) pickle. Only then can "holds Python objects besides tensors" be the problem;
    anything else is not a checkpoint, and nothing in it is worth unpickling."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            raise ConversionError(
                f"cannot read {_describe(path)}: a zip archive that is truncated or damaged; download it again and "
                "compare its size with the original"
            )
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                raise ConversionError(f"{_describe(path)} is a zip archive but not a PyTorch checkpoint (no data.pkl)")
        return
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # pickle protocol 2-5
        return
    hint = " (it starts like an HTML/XML page: a failed download?)" if head.lstrip()[:1] == b"<" else ""
    raise ConversionError(
        f"{_describe(path)} is not a checkpoint: neither a PyTorch file (a zip archive or a legacy pickle) nor "
        f"safetensors (first bytes {head!r}){hint}; check the file name and download it again"
    )


def _describe(path: Path) -> str:
    try:
        size = path.stat().st_size
    except OSError:
        return str(path)
    return f"{path} ({size:,} bytes)"


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint file into ``(state_dict, meta)``.

    Accepts ``.safetensors`` files and PyTorch files (``torch.load(..., weights_only=True)``: no
    arbitrary code runs). A PyTorch file may hold an mmsegmentation checkpoint (``{"state_dict": ...,
    "meta": ...}``), an ImageNet classification checkpoint (``{"model": ...}``) or a bare state dict.
    Python objects next to the weights (mmengine's ``message_hub``, numpy scalars in ``meta`` …), which
    ``weights_only`` refuses to build, are read as inert stand-ins and ignored (see
    :func:`_load_with_inert_objects`); only such objects *inside* the state dict are an error.

    Returns:
        ``state_dict``: ``{key: tensor}`` (an mmsegmentation ``state_dict``, or the ``model`` entry);
        ``meta``: the ``meta`` entry (``{}`` if absent).

    Raises:
        FileNotFoundError: no such file.
        ConversionError: unreadable (truncated, not a checkpoint) or holding non-tensor objects that
            ``weights_only`` loading refuses (the message says how to re-save the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (or is not a file)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path))), {}
        except (SafetensorError, OSError, ValueError) as error:
            raise ConversionError(f"cannot read {_describe(path)} as safetensors: {error}") from error
    _identify_pytorch_file(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types; all mean "cannot read"
        message = str(error)
        if "Weights only load failed" not in message and "weights_only" not in message:
            if isinstance(error, (zipfile.BadZipFile, EOFError, RuntimeError)) or "zip" in message.lower():
                raise ConversionError(
                    f"cannot read {_describe(path)}: the file is truncated or not a PyTorch checkpoint ({message}); "
                    "download it again and compare its size with the original"
                ) from error
            raise ConversionError(f"cannot read {_describe(path)}: {type(error).__name__}: {message}") from error
        payload = _load_with_inert_objects(path, error)
    if not isinstance(payload, Mapping):
        raise ConversionError(f"{path} holds a {type(payload).__name__}, not a checkpoint dict")
    for key in ("state_dict", "model", "model_ema"):
        if key in payload and isinstance(payload[key], Mapping):
            inert = sorted(k for k, v in payload[key].items() if isinstance(v, _InertObject))
            if inert:
                raise ConversionError(
                    f"{path}: the weights themselves contain Python objects that torch.load(weights_only=True) will not "
                    f"build ({', '.join(f'{k!r}: {payload[key][k]!r}' for k in inert[:5])}). Only if you trust the file, "
                    "re-save the tensors in a trusted environment and convert that file:\n"
                    f"  python -c \"import torch; c = torch.load('{path}', map_location='cpu', weights_only=False); "
                    f"torch.save({{'state_dict': {{k: torch.as_tensor(v) for k, v in c['state_dict'].items()}}}}, "
                    f"'{path.with_suffix('')}-weights.pth')\""
                )
    meta = _without_inert(payload.get("meta")) or {}
    for key in ("state_dict", "model", "model_ema"):
        if key in payload and isinstance(payload[key], Mapping):
            state_dict = payload[key]
            break
    else:
        state_dict = payload
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConversionError(
            f"{path} contains no tensors (top-level keys: {sorted(map(str, payload))[:10]}); "
            "expected an mmsegmentation checkpoint with a 'state_dict' entry"
        )
    others = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if others:
        raise ConversionError(f"{path}: state-dict entries that are not tensors: {others[:10]}")
    return dict(tensors), dict(meta) if isinstance(meta, Mapping) else {}


def _looks_like(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A short guess of which architecture a state dict belongs to, for error messages."""
    keys = list(state_dict)
    if any(k.startswith("backbone.layers.") for k in keys) and any("linear_fuse" in k or "fusion_conv" in k for k in keys):
        return "SegFormer (MiT backbone)"
    if any(k.startswith(("network.", "patch_embed.", "stem.", "stages.")) for k in keys) and "head.weight" in keys:
        return "an EfficientFormerV2 ImageNet classifier"
    if any(k.startswith("backbone.") for k in keys):
        return "another mmsegmentation model"
    return "an unknown model"


def _check_offseg_keys(state_dict: Mapping[str, torch.Tensor], path: str) -> None:
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
            f"{path} is not an OffSeg checkpoint (EfficientFormerV2 backbone + OffSeg head): it lacks {missing}; "
            f"it looks like {_looks_like(state_dict)} (first keys: {example}){hint}"
        )


# --------------------------------------------------------------------------------------------------
# Dataset, config, model, processor
# --------------------------------------------------------------------------------------------------


def resolve_dataset(num_labels: int, dataset: str | None = None, meta: Mapping | None = None) -> DatasetInfo:
    """The benchmark a checkpoint with ``num_labels`` classes was trained on.

    ``dataset`` (a name or alias) wins and must agree with ``num_labels``; otherwise the class names in
    ``meta["dataset_meta"]["classes"]`` (mmengine checkpoints store them) or the class count decide.

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
    if names:
        for name in DATASET_NAMES:
            info = get_dataset_info(name)
            if info.class_names == names:
                return info
    info = dataset_for_num_labels(num_labels)
    if info is not None and names:
        differences = [(i, a, b) for i, (a, b) in enumerate(zip(names, info.class_names)) if a != b]
        logger.warning(
            "the checkpoint's meta lists %d class names that differ from %s's (first differences, as index: "
            "checkpoint vs table: %s); using %s's names because the class count matches. Pass dataset= (--dataset) "
            "to confirm, or convert with your own id2label.",
            len(names), info.name, ", ".join(f"{i}: {a!r} vs {b!r}" for i, a, b in differences[:3]) or "count differs",
            info.name,
        )
    if info is None:
        known = ", ".join(f"{n} ({get_dataset_info(n).num_labels})" for n in DATASET_NAMES)
        raise ConversionError(
            f"the checkpoint has {num_labels} classes (decode_head.offset_learning.cls_repr), which matches none of "
            f"the OffSeg benchmarks: {known}"
        )
    return info


def _account_for_keys(state_dict: Mapping[str, torch.Tensor], model) -> None:
    """Every checkpoint key is mapped onto a model key of the same shape, or dropped by design; every
    model key is provided. Raises :class:`ConversionError` naming the checkpoint's own keys."""
    from offseg_hf.conversion.keymaps import CheckpointMismatchError, is_dropped, official_to_hf_key

    ours = model.state_dict()
    provided: dict[str, str] = {}
    problems: list[str] = []
    for key, value in state_dict.items():
        if is_dropped(key, model.config.classifier):
            continue
        try:
            target = official_to_hf_key(key)
        except CheckpointMismatchError:
            problems.append(f"unexpected key {key!r} (shape {tuple(value.shape)}): no OffSeg parameter has this name")
            continue
        if target not in ours:
            problems.append(f"unexpected key {key!r} (shape {tuple(value.shape)}): maps to {target!r}, which the model lacks")
            continue
        provided[target] = key
        shape = tuple(value.shape)
        expected = tuple(ours[target].shape)
        if shape != expected and not (target.endswith("class_embeddings") and shape == (1, *expected)):
            problems.append(f"wrong shape for {key!r}: checkpoint {shape}, model {expected} ({target!r})")
    for target, value in ours.items():
        if target not in provided:
            problems.append(f"missing key for {target!r} (shape {tuple(value.shape)}): the checkpoint has no tensor for it")
    if problems:
        raise ConversionError(f"the checkpoint does not match the model ({len(problems)} problem(s)):\n  " + "\n  ".join(problems))


def _build_model(state_dict: Mapping[str, torch.Tensor], preset: str, info: DatasetInfo):
    """Config + model with the mapped weights loaded; strict accounting of every key."""
    from offseg_hf.models.configuration_offseg import OffSegConfig
    from offseg_hf.conversion.keymaps import classifier_of, convert_official_state_dict
    from offseg_hf.models.modeling_offseg import OffSegForSemanticSegmentation

    config = OffSegConfig.from_preset(
        preset, num_labels=info.num_labels, id2label=info.id2label, label2id=info.label2id,
        classifier=classifier_of(state_dict),
    )
    model = OffSegForSemanticSegmentation(config)
    _account_for_keys(state_dict, model)
    expected = {key: value.shape for key, value in model.state_dict().items()}
    mapped = convert_official_state_dict(state_dict, config, expected_shapes=expected)  # also checks derived buffers
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if missing or unexpected:
        raise ConversionError(f"weights do not fit the model: missing {missing}, unexpected {unexpected}")
    return model.eval(), mapped


# --------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def _verify_folder(folder: Path, mapped: Mapping[str, torch.Tensor], reference_model, size: int) -> dict[str, float]:
    """Reload ``folder`` and compare it with the original tensors (through the mapping) and outputs.

    * every tensor in ``model.safetensors`` equals the original tensor it was mapped from;
    * the reloaded model and ``reference_model`` (built in memory from the original tensors) give the
      same logits on a fixed input ``randn(1, 3, size, size)`` (generator seed 0).
    """
    from transformers import AutoImageProcessor

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
    expected = reference_model(pixel_values).logits
    logits = reloaded(pixel_values).logits
    if not torch.isfinite(logits).all():
        raise ConversionError("verify: the converted model produces non-finite logits")
    logits_diff = (logits - expected).abs().max().item()
    if weight_diff != 0.0 or logits_diff > 1e-5:
        raise ConversionError(
            f"verify failed: max |saved - original| weight difference {weight_diff:.3g}, logits difference {logits_diff:.3g}"
        )
    AutoImageProcessor.from_pretrained(folder)  # the processor config must load as well
    return {"max_weight_diff": weight_diff, "max_logits_diff": logits_diff, "logits_std": logits.std().item()}


# --------------------------------------------------------------------------------------------------
# The whole flow
# --------------------------------------------------------------------------------------------------


def _card_dataset_slug(name: str) -> str:
    return {"coco-stuff": "cocostuff"}.get(name, name)


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
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for created in created_parents:  # innermost first
            try:
                created.rmdir()
            except OSError:
                break
        raise


def convert_checkpoint(
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
    """Convert an official OffSeg checkpoint into a Transformers folder (and optionally a Hub repo).

    Args:
        checkpoint: the authors' ``.pth`` (or a ``.safetensors`` with the same keys).
        output_dir: the folder to create, e.g. ``offseg-t-ade20k``. Must not exist (or be empty) unless
            ``overwrite``.
        dataset: benchmark name (``ade20k``, ``coco-stuff``, ``cityscapes``, ``pascal-context`` or an
            alias); default: decided from the class count / checkpoint meta.
        verify: reload the written folder and compare weights and logits with the original tensors.
        verify_size: side of the square random input used by ``verify``.
        overwrite: replace an existing ``output_dir``.
        push_to_hub: upload the finished folder to this Hub repo id.
        private: create the Hub repo private.
        token: Hub token (default: ``HF_TOKEN`` / the cached login).
        model_id: the name used in the model card's usage snippets (default: ``push_to_hub`` or the folder name).

    Raises:
        FileNotFoundError, ConversionError: nothing is written.
    """
    from offseg_hf.conversion.keymaps import CheckpointMismatchError, detect_preset, is_dropped, num_labels_of
    from offseg_hf.conversion.model_cards import render_model_card

    checkpoint = Path(checkpoint)
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, overwrite)
    state_dict, meta = _loaded if _loaded is not None else read_checkpoint(checkpoint)
    _check_offseg_keys(state_dict, str(checkpoint))
    try:
        preset = detect_preset(state_dict)
        num_labels = num_labels_of(state_dict)
    except CheckpointMismatchError as error:
        raise ConversionError(f"{checkpoint}: {error}") from None
    info = resolve_dataset(num_labels, dataset, meta)
    try:
        model, mapped = _build_model(state_dict, preset, info)
    except (CheckpointMismatchError, ConversionError) as error:
        raise ConversionError(f"{checkpoint} ({preset}, {info.name}): {error}") from None
    dropped = sorted(k for k in state_dict if is_dropped(k, model.config.classifier))
    processor = build_image_processor(info.name)
    num_parameters = sum(p.numel() for p in model.parameters())
    result = ConversionResult(output_dir, preset, info.name, info.num_labels, num_parameters, dropped_keys=dropped)

    def write(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        card = render_model_card(
            preset,
            info.name,
            model_id=model_id or push_to_hub or output_dir.name,
            num_parameters=num_parameters,
            source_checkpoint=checkpoint.name,
        )
        (staging / "README.md").write_text(card, encoding="utf-8")
        if verify:
            result.verification = _verify_folder(staging, mapped, model, verify_size)

    _write_atomically(output_dir, overwrite, write)
    if push_to_hub:
        result.hub_url = push_folder_to_hub(
            output_dir, push_to_hub, private=private, token=token,
            commit_message=f"Add {preset} ({info.name}) converted from {checkpoint.name}",
        )
    return result


def is_imagenet_backbone_checkpoint(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict is an EfficientFormerV2 ImageNet classifier (authors' or timm layout)."""
    keys = [k.removeprefix("module.") for k in state_dict]
    return any(k.startswith(("patch_embed.", "network.")) for k in keys) or (
        any(k.startswith("stem.conv1.") for k in keys) and any(k.startswith("stages.") for k in keys)
    )


def convert_segformer_offset_checkpoint(
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
    _loaded: tuple[dict[str, torch.Tensor], dict] | None = None,
) -> ConversionResult:
    """Convert an official "SegFormer w/ Offset Learning" checkpoint into a Transformers folder.

    Writes ``config.json`` (``model_type: segformer_offset``, the dataset's class names), ``model.safetensors``
    and ``preprocessor_config.json``, atomically; ``verify`` reloads the folder and compares every tensor and
    the logits with the in-memory model. Every reference key is mapped or explicitly dropped
    (:func:`offseg_hf.conversion.segformer.convert_segformer_offset_state_dict`).
    """
    from offseg_hf.conversion.keymaps import CheckpointMismatchError
    from offseg_hf.conversion.segformer import convert_segformer_offset_state_dict, segformer_offset_config_from_state_dict
    from offseg_hf.models.modeling_segformer_offset import SegformerOffsetForSemanticSegmentation

    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    _check_output_dir(output_dir, overwrite)
    state_dict, meta = _loaded if _loaded is not None else read_checkpoint(checkpoint)
    try:
        num_labels = int(state_dict["decode_head.offset_learning.cls_repr"].shape[-2])
        info = resolve_dataset(num_labels, dataset, meta)
        config = segformer_offset_config_from_state_dict(
            state_dict, id2label=info.id2label, label2id=info.label2id
        )
        config, converted = convert_segformer_offset_state_dict(state_dict, config)
    except CheckpointMismatchError as error:
        raise ConversionError(f"{checkpoint}: {error}") from None
    model = SegformerOffsetForSemanticSegmentation(config).eval()
    model.load_state_dict(converted, strict=True)
    dropped = sorted(k for k in state_dict if k.startswith("decode_head.conv_seg."))
    return _write_converted_model(
        model, info, checkpoint, output_dir, preset="segformer-offset", description="SegFormer + offset learning",
        dropped=dropped, verify=verify, verify_size=verify_size, overwrite=overwrite, push_to_hub=push_to_hub,
        private=private, token=token,
    )


def _write_converted_model(
    model, info: DatasetInfo, checkpoint: Path, output_dir: Path, *, preset: str, description: str, dropped: list[str],
    verify: bool, verify_size: int, overwrite: bool, push_to_hub: str | None, private: bool, token: str | None,
) -> ConversionResult:
    """Save a converted model with the dataset's processor atomically, verify, upload: the common end of
    :func:`convert_segformer_offset_checkpoint` and :func:`convert_segnext_checkpoint`."""
    processor = build_image_processor(info.name)
    result = ConversionResult(
        output_dir, preset, info.name, info.num_labels, sum(p.numel() for p in model.parameters()), dropped_keys=dropped
    )

    def write(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        if verify:
            result.verification = _verify_folder(staging, model.state_dict(), model, verify_size)

    _write_atomically(output_dir, overwrite, write)
    if push_to_hub:
        result.hub_url = push_folder_to_hub(
            output_dir, push_to_hub, private=private, token=token,
            commit_message=f"Add {description} ({info.name}) converted from {checkpoint.name}",
        )
    return result


def convert_segnext_checkpoint(
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
    _loaded: tuple[dict[str, torch.Tensor], dict] | None = None,
) -> ConversionResult:
    """Convert an official SegNeXt checkpoint, plain (mmsegmentation) or "w/ Offset Learning" (the OffSeg
    authors'), into a :class:`~offseg_hf.models.modeling_segnext.SegNextForSemanticSegmentation` folder.

    The size (T/S/B/L), the classifier (per-pixel or offset learning) and the dataset are read from the
    checkpoint; every key is mapped or explicitly dropped (:func:`offseg_hf.conversion.segnext.convert_segnext_state_dict`).
    Written atomically with ``config.json`` (the dataset's class names), ``model.safetensors`` and
    ``preprocessor_config.json``; ``verify`` reloads the folder and compares every tensor and the logits.
    """
    from offseg_hf.conversion.keymaps import CheckpointMismatchError
    from offseg_hf.conversion.segnext import convert_segnext_state_dict, preset_name, segnext_config_from_state_dict
    from offseg_hf.models.modeling_segnext import SegNextForSemanticSegmentation

    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    _check_output_dir(output_dir, overwrite)
    state_dict, meta = _loaded if _loaded is not None else read_checkpoint(checkpoint)
    try:
        config = segnext_config_from_state_dict(state_dict)
        info = resolve_dataset(config.num_labels, dataset, meta)
        config = segnext_config_from_state_dict(state_dict, id2label=info.id2label, label2id=info.label2id)
        config, converted, dropped = convert_segnext_state_dict(state_dict, config)
    except CheckpointMismatchError as error:
        raise ConversionError(f"{checkpoint}: {error}") from None
    model = SegNextForSemanticSegmentation(config).eval()
    model.load_state_dict(converted, strict=True)
    preset = preset_name(config)
    description = f"SegNeXt-{preset.split('-')[1].upper()}" + (" w/ offset learning" if config.classifier == "offset_learning" else "")
    return _write_converted_model(
        model, info, checkpoint, output_dir, preset=preset, description=description, dropped=sorted(dropped),
        verify=verify, verify_size=verify_size, overwrite=overwrite, push_to_hub=push_to_hub, private=private,
        token=token,
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
    an :class:`~offseg_hf.models.modeling_segnext.MscanBackbone` folder returning stages 2–4, the start of SegNeXt training.

    The ImageNet classifier (``head.*``) is dropped; every other key is mapped strictly. Written atomically.
    """
    from offseg_hf.conversion.keymaps import CheckpointMismatchError
    from offseg_hf.conversion.segnext import convert_mscan_state_dict, detect_mscan_variant
    from offseg_hf.models.modeling_segnext import MscanBackbone

    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    _check_output_dir(output_dir, overwrite)
    state_dict, _ = _loaded if _loaded is not None else read_checkpoint(checkpoint)
    try:
        variant = detect_mscan_variant({k.removeprefix("backbone."): v for k, v in state_dict.items()})
        config, converted, dropped = convert_mscan_state_dict(state_dict)
    except CheckpointMismatchError as error:
        raise ConversionError(f"{checkpoint}: {error}") from None
    backbone = MscanBackbone(config).eval()
    backbone.load_state_dict(converted, strict=True)
    num_parameters = sum(p.numel() for p in backbone.parameters())
    result = BackboneConversionResult(
        output_dir, variant, "mmsegmentation", "none (MSCAN has none)", num_parameters, sorted(dropped), architecture="MSCAN"
    )
    _write_atomically(output_dir, overwrite, lambda staging: backbone.save_pretrained(staging, safe_serialization=True))
    if push_to_hub:
        result.hub_url = push_folder_to_hub(
            output_dir, push_to_hub, private=private, token=token,
            commit_message=f"Add MSCAN-{variant.upper()} backbone converted from {checkpoint.name}",
        )
    return result


def convert_any_checkpoint(checkpoint: str | os.PathLike, output_dir: str | os.PathLike, **kwargs):
    """:func:`convert_checkpoint` for OffSeg checkpoints, :func:`convert_segformer_offset_checkpoint` for
    SegFormer + offset learning checkpoints, :func:`convert_segnext_checkpoint` for SegNeXt (plain or with offset
    learning), :func:`convert_backbone_checkpoint` for EfficientFormerV2 and :func:`convert_mscan_checkpoint` for
    MSCAN ImageNet checkpoints (decided from the keys; the file is read once).

    Options that only one of the two takes (``dataset``/``verify``/``verify_size``/``model_id`` for
    OffSeg, ``attention_biases`` for backbones) raise :class:`ConversionError` for the other kind.
    """
    from offseg_hf.conversion.segnext import is_mscan_backbone_state_dict, is_segnext_state_dict

    loaded = read_checkpoint(checkpoint)
    if is_segnext_state_dict(loaded[0]) or is_mscan_backbone_state_dict(loaded[0]):
        if kwargs.get("attention_biases") not in (None, "zero") or kwargs.get("model_id"):
            raise ConversionError(f"{checkpoint} is a SegNeXt/MSCAN checkpoint; attention_biases/model_id do not apply")
        kwargs.pop("attention_biases", None)
        kwargs.pop("model_id", None)
        if is_segnext_state_dict(loaded[0]):
            return convert_segnext_checkpoint(checkpoint, output_dir, _loaded=loaded, **kwargs)
        misplaced = [k for k in ("dataset", "verify") if kwargs.get(k)]
        if misplaced:
            raise ConversionError(f"{checkpoint} is an MSCAN ImageNet backbone; {misplaced} apply to segmentation checkpoints only")
        for key in ("dataset", "verify", "verify_size"):
            kwargs.pop(key, None)
        return convert_mscan_checkpoint(checkpoint, output_dir, _loaded=loaded, **kwargs)
    if is_imagenet_backbone_checkpoint(loaded[0]):
        misplaced = [k for k in ("dataset", "verify", "model_id") if kwargs.get(k)]
        if misplaced:
            raise ConversionError(f"{checkpoint} is an EfficientFormerV2 ImageNet checkpoint; {misplaced} apply to OffSeg checkpoints only")
        for key in ("dataset", "verify", "verify_size", "model_id"):
            kwargs.pop(key, None)
        kwargs["attention_biases"] = kwargs.get("attention_biases") or "zero"
        return convert_backbone_checkpoint(checkpoint, output_dir, _loaded=loaded, **kwargs)
    from offseg_hf.conversion.segformer import is_segformer_offset_state_dict

    if is_segformer_offset_state_dict(loaded[0]):
        if kwargs.get("attention_biases") not in (None, "zero") or kwargs.get("model_id"):
            raise ConversionError(f"{checkpoint} is a SegFormer + offset learning checkpoint; attention_biases/model_id do not apply")
        kwargs.pop("attention_biases", None)
        kwargs.pop("model_id", None)
        return convert_segformer_offset_checkpoint(checkpoint, output_dir, _loaded=loaded, **kwargs)
    if kwargs.get("attention_biases") not in (None, "zero"):
        raise ConversionError(f"{checkpoint} is not an EfficientFormerV2 ImageNet checkpoint; attention_biases applies to those only")
    kwargs.pop("attention_biases", None)
    return convert_checkpoint(checkpoint, output_dir, _loaded=loaded, **kwargs)


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


# --------------------------------------------------------------------------------------------------
# Hub upload
# --------------------------------------------------------------------------------------------------


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
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=commit_message)
    return str(getattr(commit, "commit_url", commit))


# --------------------------------------------------------------------------------------------------
# EfficientFormerV2 ImageNet weights → backbone
# --------------------------------------------------------------------------------------------------

ATTENTION_BIAS_POLICIES = ("zero", "transfer")

_CLASSIFIER_KEY = re.compile(r"^(norm|head|dist_head|head_dist)\.")

# timm attention sub-module names -> reference (``Sequential`` indices).
_TIMM_ATTENTION_RULES: list[tuple[str, str]] = [
    (r"^q\.local\.(weight|bias)$", r"q.local.0.\1"),
    (r"^q\.proj\.conv\.", "q.proj.0."),
    (r"^q\.proj\.bn\.", "q.proj.1."),
    (r"^(q|k|v|v_local|stride_conv)\.conv\.", r"\1.0."),
    (r"^(q|k|v|v_local|stride_conv)\.bn\.", r"\1.1."),
    (r"^proj\.conv\.", "proj.1."),
    (r"^proj\.bn\.", "proj.2."),
]
_TIMM_MLP_RULES: list[tuple[str, str]] = [
    (r"^mlp\.fc1\.conv\.", "mlp.fc1."),
    (r"^mlp\.fc1\.bn\.", "mlp.norm1."),
    (r"^mlp\.mid\.conv\.", "mlp.mid."),
    (r"^mlp\.mid\.bn\.", "mlp.mid_norm."),
    (r"^mlp\.fc2\.conv\.", "mlp.fc2."),
    (r"^mlp\.fc2\.bn\.", "mlp.norm2."),
]


def _apply_rules(rules, text: str) -> str:
    for pattern, replacement in rules:
        new, count = re.subn(pattern, replacement, text)
        if count:
            return new
    return text


def _timm_to_reference_key(key: str, attention_downsample: set[int]) -> str | None:
    """timm ``efficientformerv2_*`` key → reference (authors') key; ``None`` if not a backbone key."""
    match = re.match(r"^stem\.conv([12])\.(conv|bn)\.(.+)$", key)
    if match:
        index = {("1", "conv"): 0, ("1", "bn"): 1, ("2", "conv"): 3, ("2", "bn"): 4}[match.group(1), match.group(2)]
        return f"patch_embed.{index}.{match.group(3)}"
    match = re.match(r"^stages\.(\d+)\.downsample\.(.+)$", key)
    if match:
        stage, rest = int(match.group(1)), match.group(2)
        with_attention = stage in attention_downsample
        if rest.startswith("conv.conv."):
            rest = ("conv." if with_attention else "proj.") + rest[len("conv.conv."):]
        elif rest.startswith("conv.bn."):
            rest = ("bn." if with_attention else "norm.") + rest[len("conv.bn."):]
        elif rest.startswith("attn."):
            rest = "attn." + _apply_rules(_TIMM_ATTENTION_RULES, rest[len("attn."):])
        return f"network.{2 * stage - 1}.{rest}"
    match = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$", key)
    if match:
        stage, block, rest = int(match.group(1)), match.group(2), match.group(3)
        if rest in ("ls1.gamma", "ls2.gamma"):
            rest = f"layer_scale_{rest[2]}"
        elif rest.startswith("mlp."):
            rest = _apply_rules(_TIMM_MLP_RULES, rest)
        elif rest.startswith("token_mixer."):
            rest = "token_mixer." + _apply_rules(_TIMM_ATTENTION_RULES, rest[len("token_mixer."):])
        return f"network.{2 * stage}.{block}.{rest}"
    return None


def imagenet_to_reference_backbone(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str], str]:
    """Rename an EfficientFormerV2 ImageNet state dict to the reference segmentation-backbone layout.

    Accepts the authors' layout (``patch_embed.*``, ``network.*``; their ``.pth`` files hold it under
    ``model``) and timm's (``stem.*``, ``stages.*``). timm's per-channel layer scales `(C,)` become
    `(C, 1, 1)`.

    Returns:
        ``(weights, imagenet_attention_biases, dropped, layout)``: ``weights`` in reference names (what
        ``offseg_hf.conversion.keymaps.backbone_key`` accepts), without attention biases; the ImageNet
        relative-position tables ``{reference attention module prefix: (heads, g*g) tensor}``; the keys
        deliberately not used (classifier ``head``, distillation head, final ``norm``, index buffers);
        ``layout`` ``"official"`` or ``"timm"``.

    Raises:
        ConversionError: neither layout, or keys that belong to no backbone part.
    """
    keys = [k.removeprefix("module.") for k in state_dict]
    values = dict(zip(keys, state_dict.values()))
    if any(k.startswith(("stem.", "stages.")) for k in keys):
        layout = "timm"
        attention_downsample = {
            int(m.group(1)) for k in keys if (m := re.match(r"^stages\.(\d+)\.downsample\.attn\.", k))
        }
    elif any(k.startswith(("patch_embed.", "network.")) for k in keys):
        layout = "official"
    else:
        raise ConversionError(
            "not an EfficientFormerV2 ImageNet state dict: expected the authors' 'patch_embed.*'/'network.*' keys or "
            f"timm's 'stem.*'/'stages.*' keys, got {keys[:4]}"
        )
    weights: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for key, value in values.items():
        if _CLASSIFIER_KEY.match(key) or key.endswith(("attention_bias_idxs", "attention_bias_idxs_seg")):
            dropped.append(key)
            continue
        reference = key if layout == "official" else _timm_to_reference_key(key, attention_downsample)
        if reference is None or not reference.startswith(("patch_embed.", "network.")):
            unknown.append(key)
            continue
        if reference.endswith(".attention_biases") or reference.endswith(".attention_biases_seg"):
            biases[reference.rsplit(".", 1)[0]] = value
            continue
        if re.search(r"\.layer_scale_[12]$", reference) and value.ndim == 1:
            value = value.reshape(-1, 1, 1)
        weights[reference] = value
    if unknown:
        raise ConversionError(f"keys that are not part of an EfficientFormerV2 ({layout} layout): {unknown[:10]}")
    return weights, biases, sorted(dropped), layout


def transfer_attention_biases(table: torch.Tensor, grid: int) -> torch.Tensor:
    """Carry an ImageNet relative-position table over to a larger token grid.

    A table `(heads, g*g)` holds one bias per absolute offset ``(|Δy|, |Δx|)`` at slot ``|Δy|·g + |Δx|``
    (reference and timm order). The token spacing in pixels is the same at 224 and 512 inputs (stride 32
    for the stage-3/4 attention grids, stride 16 for the keys of the downsampling attention), so offset
    ``d`` means the same distance in both: the learned biases are copied for offsets ``< g`` and the
    outermost learned value is repeated for the offsets only the larger grid has. (Resizing the table
    bicubically would instead stretch every distance by ``grid / g``.)

    Args:
        table: `(heads, g*g)`.
        grid: the target grid side ``G``.

    Returns:
        `(heads, G*G)`.
    """
    heads, size = table.shape
    source = round(size**0.5)
    if source * source != size:
        raise ConversionError(f"attention bias table of shape {tuple(table.shape)} is not a square grid of offsets")
    index = torch.clamp(torch.arange(grid), max=source - 1)
    square = table.reshape(heads, source, source)
    return square[:, index][:, :, index].reshape(heads, grid * grid).clone()


@dataclass
class BackboneLoadReport:
    """What :func:`load_imagenet_backbone_weights` did."""

    layout: str
    attention_biases: str
    loaded: list[str]
    dropped: list[str]
    zeroed: list[str]


def _target_backbone(module):
    """The :class:`EfficientFormerV2Backbone` inside ``module`` (itself, an OffSeg model, …)."""
    from offseg_hf.models.modeling_efficientformer_v2 import EfficientFormerV2Backbone

    if isinstance(module, EfficientFormerV2Backbone):
        return module
    for name in ("backbone", "offseg"):
        child = getattr(module, name, None)
        if child is not None:
            return _target_backbone(child)
    raise TypeError(f"{type(module).__name__} holds no EfficientFormerV2Backbone")


@torch.no_grad()
def load_imagenet_backbone_weights(
    module,
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    attention_biases: str = "zero",
) -> BackboneLoadReport:
    """Load EfficientFormerV2 ImageNet weights into a backbone, as OffSeg training starts.

    Args:
        module: an :class:`EfficientFormerV2Backbone`, or a model holding one
            (:class:`OffSegForSemanticSegmentation`, :class:`OffSegModel`).
        checkpoint: the authors' file (``eformer_s0_450.pth`` … ``eformer_l_450.pth``, a dict with
            ``model``), a timm ``efficientformerv2_*`` state dict or file, or a state dict in either layout.
        attention_biases: what the segmentation backbone's relative-position tables (laid out for 512
            inputs: 16×16 grids, 32×32 keys in the downsampling attention) start from:

            * ``"zero"`` (default, the reference): zeros. The authors' segmentation backbone registers
              separate ``attention_biases_seg`` tables initialised to zero, and mmengine's checkpoint
              loading skips the ImageNet ``attention_biases`` (different name), so every published OffSeg
              model started training from zero biases. This reproduces the paper's recipe.
            * ``"transfer"``: :func:`transfer_attention_biases` (copy per offset, repeat the edge). A table
              that already has the target size (e.g. a timm model built with ``img_size=512``) is copied as is.

    Every checkpoint key is loaded or on the explicit drop list (classifier ``head``, distillation head,
    final ``norm``, index buffers; under ``"zero"`` also the ImageNet ``attention_biases``); a missing,
    unexpected or wrongly shaped key raises :class:`ConversionError` naming it.
    """
    from offseg_hf.conversion.keymaps import CheckpointMismatchError, backbone_key

    if attention_biases not in ATTENTION_BIAS_POLICIES:
        raise ValueError(f"attention_biases must be one of {ATTENTION_BIAS_POLICIES}, got {attention_biases!r}")
    backbone = _target_backbone(module)
    source = str(checkpoint) if not isinstance(checkpoint, Mapping) else "state dict"
    state_dict = checkpoint if isinstance(checkpoint, Mapping) else read_checkpoint(checkpoint)[0]
    weights, tables, dropped, layout = imagenet_to_reference_backbone(state_dict)

    ours = backbone.state_dict()
    target: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for reference, value in weights.items():
        try:
            key = backbone_key(reference)
        except CheckpointMismatchError:
            problems.append(f"unexpected key {reference!r} (shape {tuple(value.shape)})")
            continue
        if key not in ours:
            problems.append(f"unexpected key {reference!r} (→ {key!r}, shape {tuple(value.shape)})")
        elif ours[key].shape != value.shape:
            problems.append(f"wrong shape for {reference!r}: checkpoint {tuple(value.shape)}, backbone {tuple(ours[key].shape)}")
        else:
            target[key] = value
    bias_keys = sorted(k for k in ours if k.endswith("relative_position.attention_biases"))
    zeroed: list[str] = []
    used_tables: set[str] = set()
    for key in bias_keys:
        if attention_biases == "zero":
            target[key] = torch.zeros_like(ours[key])
            zeroed.append(key)
            continue
        prefix = next((p for p in tables if backbone_key(p + ".attention_biases_seg") == key), None)
        if prefix is None:
            problems.append(f"missing attention bias table for {key!r} (shape {tuple(ours[key].shape)})")
            continue
        used_tables.add(prefix)
        table = tables[prefix]
        grid = round(ours[key].shape[1] ** 0.5)
        value = table if table.shape == ours[key].shape else transfer_attention_biases(table, grid)
        if value.shape != ours[key].shape:
            problems.append(f"wrong shape for {prefix}.attention_biases: {tuple(table.shape)}, backbone {tuple(ours[key].shape)}")
        target[key] = value
    if attention_biases == "zero":
        dropped = sorted(dropped + [p + ".attention_biases" for p in tables])
    else:
        problems.extend(f"unexpected key {p}.attention_biases" for p in sorted(set(tables) - used_tables))
    problems.extend(f"missing key {key!r} (shape {tuple(ours[key].shape)})" for key in ours if key not in target)
    if problems:
        widths = [v.shape[0] for k, v in weights.items() if re.match(r"^(patch_embed\.3|network\.[135]\.(proj|conv))\.weight$", k)]
        counts = ", ".join(
            f"{sum(p.startswith(kind) for p in problems)} {label}"
            for kind, label in (("wrong shape", "wrong shape(s)"), ("missing", "missing"), ("unexpected", "unexpected"))
        )
        raise ConversionError(
            f"{source} ({layout} layout, stage widths {widths}) does not fit this EfficientFormerV2 backbone "
            f"(hidden_sizes {list(backbone.config.hidden_sizes)}, depths {list(backbone.config.depths)}): {counts}\n  "
            + "\n  ".join(problems[:20])
            + (f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else "")
        )
    backbone.load_state_dict(target, strict=True)
    return BackboneLoadReport(layout, attention_biases, sorted(target), dropped, zeroed)


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


def detect_backbone_variant(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The EfficientFormerV2 variant (``"s0"``, ``"s1"``, ``"s2"``, ``"l"``) of an ImageNet state dict,
    from its stage widths and block counts."""
    from offseg_hf.models.configuration_offseg import EFFICIENTFORMER_V2_VARIANTS

    weights, _, _, _ = imagenet_to_reference_backbone(state_dict)
    try:
        widths = [weights["patch_embed.3.weight"].shape[0]] + [
            weights[f"network.{i}.{'conv' if f'network.{i}.conv.weight' in weights else 'proj'}.weight"].shape[0]
            for i in (1, 3, 5)
        ]
    except KeyError as error:
        raise ConversionError(f"not a complete EfficientFormerV2 state dict: {error.args[0]!r} is missing") from None
    depths = [
        len({m.group(1) for k in weights if (m := re.match(rf"^network\.{2 * s}\.(\d+)\.mlp\.fc1\.weight$", k))})
        for s in range(4)
    ]
    for variant, spec in EFFICIENTFORMER_V2_VARIANTS.items():
        if list(spec["hidden_sizes"]) == widths and list(spec["depths"]) == depths:
            return variant
    raise ConversionError(f"unknown EfficientFormerV2 variant: stage widths {widths}, blocks per stage {depths}")


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
    ``attention_biases`` and what is dropped. Written atomically like :func:`convert_checkpoint`.
    """
    from offseg_hf.models.configuration_offseg import EfficientFormerV2Config
    from offseg_hf.conversion.model_cards import render_backbone_card
    from offseg_hf.models.modeling_efficientformer_v2 import EfficientFormerV2Backbone

    checkpoint = Path(checkpoint)
    output_dir = Path(output_dir)
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
    num_parameters = sum(p.numel() for p in backbone.parameters())
    result = BackboneConversionResult(
        output_dir, variant, report.layout, attention_biases, num_parameters, report.dropped
    )

    def write(staging: Path) -> None:
        backbone.save_pretrained(staging, safe_serialization=True)
        card = render_backbone_card(
            variant, model_id=push_to_hub or output_dir.name, num_parameters=num_parameters,
            source_checkpoint=checkpoint.name, attention_biases=attention_biases,
        )
        (staging / "README.md").write_text(card, encoding="utf-8")

    _write_atomically(output_dir, overwrite, write)
    if push_to_hub:
        result.hub_url = push_folder_to_hub(
            output_dir, push_to_hub, private=private, token=token,
            commit_message=f"Add EfficientFormerV2-{variant.upper()} backbone converted from {checkpoint.name}",
        )
    return result
