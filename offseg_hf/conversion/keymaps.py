"""State-dict mapping from the reference (mmsegmentation-fork) key layout to ours.

Every reference key is either renamed (``official_to_hf_key``) or on an explicit drop list:

* ``decode_head.conv_seg.*``: the per-pixel classifier the reference head declares; unused (dropped) by the
  offset-learning models, it *is* the classifier of the per-pixel baseline (paper Table 6: a checkpoint without
  ``decode_head.offset_learning.*``), where it maps onto ``classifier.*``;
* ``*.attention_biases`` / ``*.attention_bias_idxs``: the ImageNet (224-input) tables the segmentation
  backbone registers but never uses (it uses the ``*_seg`` tables);
* ``*.attention_bias_idxs_seg``, ``*.dysampler.init_pos``, ``*.hamming_lowpass`` / ``*.hamming_highpass``:
  constant buffers that our modules derive from their configuration. They are checked against what we
  derive, so a checkpoint built differently is rejected instead of silently mis-loaded.

:func:`convert_official_state_dict` raises :class:`~offseg_hf.conversion.accounting.ConversionError` naming every
missing, unexpected or wrongly shaped key (:func:`~offseg_hf.conversion.accounting.account_for_keys`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from offseg_hf.conversion.accounting import ConversionError, account_for_keys, rename
from offseg_hf.models.configuration_offseg import EFFICIENTFORMER_V2_VARIANTS, OFFSEG_PRESETS, OffSegConfig
from offseg_hf.models.modeling_efficientformer_v2 import relative_position_index
from offseg_hf.models.modeling_offseg import OffSegSimilaritySampler

# Reference head prefix -> ours (inside OffSegForSemanticSegmentation).
_HEAD_RULES: list[tuple[str, str]] = [
    (r"^decode_head\.pre\.(\d+)\.conv\.", r"offseg.decoder.stage_projections.\1.conv."),
    (r"^decode_head\.pre\.(\d+)\.gn\.", r"offseg.decoder.stage_projections.\1.norm."),
    (r"^decode_head\.align\.conv\.", "offseg.decoder.align.conv."),
    (r"^decode_head\.align\.gn\.", "offseg.decoder.align.norm."),
    (r"^decode_head\.freqfusions\.(\d+)\.content_encoder2\.", r"offseg.decoder.fusions.\1.highpass_encoder."),
    (r"^decode_head\.freqfusions\.(\d+)\.content_encoder\.", r"offseg.decoder.fusions.\1.lowpass_encoder."),
    (r"^decode_head\.freqfusions\.(\d+)\.dysampler\.", r"offseg.decoder.fusions.\1.resampler."),
    (r"^decode_head\.freqfusions\.(\d+)\.", r"offseg.decoder.fusions.\1."),
    (r"^decode_head\.offset_learning\.cls_repr$", "offset_learning.class_embeddings"),
    (r"^decode_head\.offset_learning\.cls_offset_proj\.", "offset_learning.class_offset_proj."),
    (r"^decode_head\.offset_learning\.feat_offset_proj\.", "offset_learning.feature_offset_proj."),
    (r"^decode_head\.offset_learning\.mask_norm\.", "offset_learning.mask_norm."),
    (r"^decode_head\.conv_seg\.", "classifier."),
]

# Inside an attention module: Sequential indices -> named conv/norm.
_ATTENTION_RULES: list[tuple[str, str]] = [
    (r"\.q\.local\.0\.", ".q.local."),
    (r"\.q\.proj\.0\.", ".q.proj.conv."),
    (r"\.q\.proj\.1\.", ".q.proj.norm."),
    (r"\.(q|k|v|v_local|stride_conv)\.0\.", r".\1.conv."),
    (r"\.(q|k|v|v_local|stride_conv)\.1\.", r".\1.norm."),
    (r"\.proj\.1\.", ".proj.conv."),
    (r"\.proj\.2\.", ".proj.norm."),
    (r"\.attention_biases_seg$", ".relative_position.attention_biases"),
]

_STEM = {"0": "conv1.conv", "1": "conv1.norm", "3": "conv2.conv", "4": "conv2.norm"}

DROPPED_KEY_PATTERNS = (
    r"\.attention_biases$",
    r"\.attention_bias_idxs$",
)
# Dropped only from offset-learning checkpoints, whose head declares conv_seg without using it.
UNUSED_CLASSIFIER_PATTERN = r"^decode_head\.conv_seg\.(weight|bias)$"
DERIVED_KEY_PATTERNS = (
    r"\.attention_bias_idxs_seg$",
    r"\.dysampler\.init_pos$",
    r"\.hamming_(lowpass|highpass)$",
)


def backbone_key(key: str) -> str:
    """Reference backbone key (without ``backbone.``) → ours inside :class:`EfficientFormerV2Backbone`."""
    match = re.match(r"^patch_embed\.(\d+)\.(.+)$", key)
    if match:
        if match.group(1) not in _STEM:
            raise ConversionError(f"unknown stem key {key!r}")
        return f"embeddings.{_STEM[match.group(1)]}.{match.group(2)}"
    match = re.match(r"^network\.(\d+)\.(.+)$", key)
    if not match:
        raise ConversionError(f"unknown backbone key {key!r}")
    index, rest = int(match.group(1)), match.group(2)
    if index % 2 == 0:  # blocks of stage index // 2
        block = re.match(r"^(\d+)\.(.+)$", rest)
        rest = block.group(2).replace("token_mixer.", "attention.", 1)
        rest = rest.replace("mlp.mid_norm.", "mlp.depthwise_norm.").replace("mlp.mid.", "mlp.depthwise.")
        new = f"stages.{index // 2}.blocks.{block.group(1)}.{rest}"
    else:  # downsampling into stage (index + 1) // 2
        for old, ours in (("proj.", "conv.conv."), ("norm.", "conv.norm."), ("conv.", "conv.conv."),
                          ("bn.", "conv.norm."), ("attn.", "attention.")):
            if rest.startswith(old):
                rest = ours + rest[len(old):]
                break
        new = f"stages.{(index + 1) // 2}.downsample.{rest}"
    for pattern, replacement in _ATTENTION_RULES:
        new = re.sub(pattern, replacement, new)
    return new


def official_to_hf_key(key: str) -> str:
    """Reference OffSeg key → key of :class:`OffSegForSemanticSegmentation`."""
    if key.startswith("backbone."):
        return "offseg.backbone." + backbone_key(key[len("backbone."):])
    new = rename(_HEAD_RULES, key)
    if new is None:
        raise ConversionError(f"unknown key {key!r}")
    return new


def _is(patterns, key: str) -> bool:
    return any(re.search(pattern, key) for pattern in patterns)


def classifier_of(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"offset_learning"`` for a reference OffSeg checkpoint, ``"per_pixel"`` for the Table 6 baseline (no
    ``decode_head.offset_learning.*`` keys, the 1×1 ``decode_head.conv_seg`` classifier instead)."""
    has_offsets = any(key.startswith("decode_head.offset_learning.") for key in state_dict)
    return "offset_learning" if has_offsets else "per_pixel"


def is_dropped(key: str, classifier: str) -> bool:
    """Whether a reference key is deliberately not loaded (unused tables, the unused ``conv_seg``) or derived."""
    unused_classifier = classifier == "offset_learning" and re.search(UNUSED_CLASSIFIER_PATTERN, key)
    return bool(unused_classifier) or _is(DROPPED_KEY_PATTERNS + DERIVED_KEY_PATTERNS, key)


def _check_derived(key: str, value: torch.Tensor, resample_groups: int) -> str | None:
    """Compare a derived buffer with what our modules compute; returns a problem description or None."""
    if key.endswith("hamming_lowpass") or key.endswith("hamming_highpass"):
        if value.numel() != 1 or float(value.reshape(-1)[0]) != 1.0:
            return f"{key}: only hamming_window=False (buffer [1.0]) is supported, got shape {tuple(value.shape)}"
        return None
    if key.endswith("init_pos"):
        expected = OffSegSimilaritySampler(8, resample_groups, 3).initial_positions("cpu", torch.float32)
        if value.shape != expected.shape or not torch.equal(value.float(), expected):
            return f"{key}: initial sampling positions differ from the standard 2× layout"
        return None
    if key.endswith("attention_bias_idxs_seg"):
        queries, keys = value.shape
        query_grid, key_grid = round(queries**0.5), round(keys**0.5)
        expected, _ = relative_position_index(query_grid, key_grid)
        if not torch.equal(value.long(), expected):
            return f"{key}: relative-position index differs from the {query_grid}²×{key_grid}² layout we derive"
    return None


def convert_official_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    config: OffSegConfig,
    expected_shapes: Mapping[str, torch.Size] | None = None,
) -> dict[str, torch.Tensor]:
    """Map a reference OffSeg state dict onto :class:`OffSegForSemanticSegmentation` keys.

    Args:
        state_dict: the reference ``state_dict`` (``backbone.*`` and ``decode_head.*`` keys).
        config: the target configuration (for derived-buffer checks).
        expected_shapes: our model's ``{key: shape}`` (``{k: v.shape for k, v in model.state_dict().items()}``);
            when given, every key must be present with the right shape.

    Returns:
        Our state dict (class embeddings reshaped from `(1, K, C)` to `(K, C)`).

    Raises:
        ConversionError: listing unknown, missing and wrongly shaped keys, and derived buffers that disagree
            with ours.
    """
    converted: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    unknown: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, value in state_dict.items():
        if is_dropped(key, config.classifier) and not _is(DERIVED_KEY_PATTERNS, key):
            continue
        if _is(DERIVED_KEY_PATTERNS, key):
            problem = _check_derived(key, value, config.freqfusion_resample_groups)
            if problem:
                problems.append(problem)
            continue
        try:
            new_key = official_to_hf_key(key)
        except ConversionError:
            unknown[key] = value
            continue
        if new_key == "offset_learning.class_embeddings" and value.ndim == 3:
            value = value.reshape(value.shape[-2:])
        converted[new_key], sources[new_key] = value, key
    if expected_shapes is None:  # only the checkpoint's own consistency
        expected_shapes = {key: value.shape for key, value in converted.items()}
    account_for_keys(converted, expected_shapes, sources=sources, unknown=unknown, problems=problems, what="OffSeg")
    return converted


def detect_preset(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The OffSeg preset (``"offseg-t"``, ``"offseg-b"`` or ``"offseg-l"``) of a reference state dict.

    Decided from the backbone widths (stem output and last stage) and the decoder stage channels.
    """
    try:
        stem = state_dict["backbone.patch_embed.3.weight"].shape[0]
        last = state_dict["backbone.network.6.0.mlp.fc1.weight"].shape[1]
        decoder = [state_dict[f"decode_head.pre.{i}.conv.weight"].shape[0] for i in range(4)]
    except KeyError as error:
        raise ConversionError(
            f"not an OffSeg checkpoint: key {error.args[0]!r} is missing "
            "(expected EfficientFormerV2 'backbone.*' and OffSeg 'decode_head.pre.*' keys)"
        ) from None
    for preset, spec in OFFSEG_PRESETS.items():
        widths = EFFICIENTFORMER_V2_VARIANTS[spec["backbone_variant"]]["hidden_sizes"]
        if (stem, last) == (widths[0], widths[-1]) and decoder == spec["decoder_stage_channels"]:
            return preset
    raise ConversionError(
        f"unrecognised OffSeg variant: stem width {stem}, last stage width {last}, decoder channels {decoder}"
    )


def num_labels_of(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Number of classes K of a reference OffSeg state dict (from ``cls_repr`` `(1, K, C)`, or for the per-pixel
    baseline from ``conv_seg.weight`` `(K, C, 1, 1)`)."""
    for key in ("decode_head.offset_learning.cls_repr", "decode_head.conv_seg.weight"):
        if key in state_dict:
            return int(state_dict[key].shape[-2] if key.endswith("cls_repr") else state_dict[key].shape[0])
    raise ConversionError(
        "not an OffSeg checkpoint: neither 'decode_head.offset_learning.cls_repr' nor 'decode_head.conv_seg.weight' is present"
    )


__all__ = [
    "DERIVED_KEY_PATTERNS",
    "DROPPED_KEY_PATTERNS",
    "backbone_key",
    "classifier_of",
    "convert_official_state_dict",
    "is_dropped",
    "detect_preset",
    "num_labels_of",
    "official_to_hf_key",
]
