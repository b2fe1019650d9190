"""Official SegNeXt checkpoints → :class:`SegNextForSemanticSegmentation` / :class:`MscanBackbone`.

Three kinds of files share the MSCAN key layout (``patch_embed{i}``, ``block{i}.{j}``, ``norm{i}``):

* mmsegmentation's plain SegNeXt (``backbone.*`` + ``decode_head.*`` of ``LightHamHead``, whose 1×1
  ``decode_head.conv_seg`` is the classifier);
* the OffSeg authors' "SegNeXt w/ Offset Learning" (``LightHamHeadOffsetLearning``: the same plus
  ``decode_head.offset_learning.*``; its ``conv_seg`` is never used and is dropped);
* MSCAN ImageNet backbones (``mscan_{t,s,b,l}`` files: the backbone keys without ``backbone.``, plus an
  ImageNet classifier ``head.*`` that is dropped).

Every key is renamed (:func:`segnext_key`, :func:`mscan_key`), reshaped (``offset_learning.cls_repr`` `(1, K, C)` →
``class_embeddings`` `(K, C)`) or explicitly dropped; anything else (unknown, missing, wrongly shaped keys)
raises :class:`~offseg_hf.conversion.accounting.ConversionError` naming every culprit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from offseg_hf.conversion.accounting import ConversionError, account_for_keys, expected_shapes, rename
from offseg_hf.models.configuration_segnext import MSCAN_VARIANTS, SEGNEXT_PRESETS, MscanConfig, SegNextConfig
from offseg_hf.models.modeling_segnext import MscanBackbone, SegNextForSemanticSegmentation

_BACKBONE_RULES: list[tuple[str, str]] = [
    (r"^patch_embed1\.proj\.0\.", "embeddings.conv1."),
    (r"^patch_embed1\.proj\.1\.", "embeddings.norm1."),
    (r"^patch_embed1\.proj\.3\.", "embeddings.conv2."),
    (r"^patch_embed1\.proj\.4\.", "embeddings.norm2."),
    (r"^patch_embed([2-9])\.proj\.", lambda m: f"stages.{int(m.group(1)) - 1}.downsample.conv."),
    (r"^patch_embed([2-9])\.norm\.", lambda m: f"stages.{int(m.group(1)) - 1}.downsample.norm."),
    (r"^norm(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.norm."),
]
_BLOCK = re.compile(r"^block(\d)\.(\d+)\.(.+)$")
_BLOCK_RULES: list[tuple[str, str]] = [
    (r"^attn\.proj_1\.", "attention.input_projection."),
    (r"^attn\.proj_2\.", "attention.output_projection."),
    (r"^attn\.spatial_gating_unit\.conv0\.", "attention.msca.depthwise_conv."),
    (r"^attn\.spatial_gating_unit\.conv(\d)_1\.", r"attention.msca.strip_convolutions.\1.horizontal."),
    (r"^attn\.spatial_gating_unit\.conv(\d)_2\.", r"attention.msca.strip_convolutions.\1.vertical."),
    (r"^attn\.spatial_gating_unit\.conv3\.", "attention.msca.channel_mixing."),
    (r"^mlp\.dwconv\.", "mlp.depthwise_conv."),
    (r"^(mlp\.fc[12]\.|norm[12]\.|layer_scale_[12]$)", r"\1"),
]
_HEAD_RULES: list[tuple[str, str]] = [
    (r"^decode_head\.(squeeze|align)\.conv\.", r"decode_head.\1.conv."),
    (r"^decode_head\.(squeeze|align)\.gn\.", r"decode_head.\1.norm."),
    (r"^decode_head\.hamburger\.ham_in\.conv\.", "decode_head.hamburger.ham_in."),
    (r"^decode_head\.hamburger\.ham_out\.conv\.", "decode_head.hamburger.ham_out.conv."),
    (r"^decode_head\.hamburger\.ham_out\.gn\.", "decode_head.hamburger.ham_out.norm."),
    (r"^decode_head\.offset_learning\.cls_repr$", "offset_learning.class_embeddings"),
    (r"^decode_head\.offset_learning\.cls_offset_proj\.", "offset_learning.class_offset_proj."),
    (r"^decode_head\.offset_learning\.feat_offset_proj\.", "offset_learning.feature_offset_proj."),
    (r"^decode_head\.offset_learning\.mask_norm\.", "offset_learning.mask_norm."),
    (r"^decode_head\.conv_seg\.", "classifier."),
]
# The ImageNet classifier of MSCAN backbone checkpoints.
IMAGENET_HEAD_PATTERN = r"^head\."


def mscan_key(key: str) -> str:
    """Reference MSCAN key (without ``backbone.``) → key inside :class:`MscanBackbone`."""
    block = _BLOCK.match(key)
    if block:
        rest = rename(_BLOCK_RULES, block.group(3))
        if rest is not None:
            return f"stages.{int(block.group(1)) - 1}.blocks.{block.group(2)}.{rest}"
    else:
        new = rename(_BACKBONE_RULES, key)
        if new is not None:
            return new
    raise ConversionError(f"unknown MSCAN key {key!r}")


def segnext_key(key: str) -> str:
    """Reference SegNeXt key → key of :class:`SegNextForSemanticSegmentation` (``conv_seg`` → ``classifier``)."""
    if key.startswith("backbone."):
        return "backbone." + mscan_key(key[len("backbone."):])
    new = rename(_HEAD_RULES, key)
    if new is None:
        raise ConversionError(f"unknown key {key!r}")
    return new


def is_segnext_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a reference state dict is a SegNeXt (plain or with offset learning) segmentation checkpoint."""
    return "backbone.patch_embed1.proj.0.weight" in state_dict and any(k.startswith("decode_head.hamburger.") for k in state_dict)


def is_mscan_backbone_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict is an MSCAN ImageNet backbone (``patch_embed1.proj.0.weight`` without a prefix)."""
    return "patch_embed1.proj.0.weight" in state_dict and "block1.0.attn.proj_1.weight" in state_dict


def _unwrap(state_dict: Mapping) -> Mapping[str, torch.Tensor]:
    """Accept a training checkpoint ``{"state_dict": …}`` as well as a bare state dict."""
    inner = state_dict.get("state_dict") if isinstance(state_dict, Mapping) else None
    return inner if isinstance(inner, Mapping) else state_dict


def detect_mscan_variant(state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> str:
    """The MSCAN variant (``"t"``, ``"s"``, ``"b"``, ``"l"``) from the stage widths and block counts."""
    try:
        widths = [int(state_dict[f"{prefix}norm{i}.weight"].shape[0]) for i in range(1, 5)]
    except KeyError as error:
        raise ConversionError(f"not a complete MSCAN state dict: {error.args[0]!r} is missing") from None
    depths = [
        len({m.group(1) for k in state_dict if (m := re.match(rf"^{re.escape(prefix)}block{i}\.(\d+)\.", k))})
        for i in range(1, 5)
    ]
    for variant, spec in MSCAN_VARIANTS.items():
        if spec["hidden_sizes"] == widths and spec["depths"] == depths:
            return variant
    raise ConversionError(f"unknown MSCAN variant: stage widths {widths}, blocks per stage {depths}")


def segnext_config_from_state_dict(state_dict: Mapping[str, torch.Tensor], **kwargs) -> SegNextConfig:
    """The architecture of a reference SegNeXt state dict: MSCAN variant, head width, classifier type, classes."""
    state_dict = _unwrap(state_dict)
    if not is_segnext_state_dict(state_dict):
        example = ", ".join(repr(k) for k in list(state_dict)[:3])
        raise ConversionError(f"not a SegNeXt checkpoint (no MSCAN backbone + Hamburger head; first keys: {example})")
    variant = detect_mscan_variant(state_dict, prefix="backbone.")
    try:
        channels = int(state_dict["decode_head.squeeze.conv.weight"].shape[0])
        width = int(state_dict["decode_head.align.conv.weight"].shape[0])
    except KeyError as error:
        raise ConversionError(f"SegNeXt checkpoint without {error.args[0]!r}") from None
    if "decode_head.offset_learning.cls_repr" in state_dict:
        classifier = "offset_learning"
        num_labels = int(state_dict["decode_head.offset_learning.cls_repr"].shape[-2])
    elif "decode_head.conv_seg.weight" in state_dict:
        classifier = "per_pixel"
        num_labels = int(state_dict["decode_head.conv_seg.weight"].shape[0])
    else:
        raise ConversionError(
            "SegNeXt checkpoint without a classifier: neither decode_head.offset_learning.cls_repr nor decode_head.conv_seg.weight"
        )
    preset = next(
        (name for name, spec in SEGNEXT_PRESETS.items() if spec["backbone_variant"] == variant), f"segnext-{variant}"
    )
    fields = {"classifier": classifier, "num_labels": num_labels, "hamburger_channels": channels, "decoder_hidden_size": width}
    fields.update(kwargs)
    return SegNextConfig.from_preset(preset, **fields)


def preset_name(config: SegNextConfig) -> str:
    """``"segnext-t"`` … with ``-offset`` for offset learning, from the backbone widths and depths."""
    backbone = config.backbone_config
    for variant, spec in MSCAN_VARIANTS.items():
        if spec["hidden_sizes"] == list(backbone.hidden_sizes) and spec["depths"] == list(backbone.depths):
            return f"segnext-{variant}" + ("-offset" if config.classifier == "offset_learning" else "")
    return "segnext-custom"


def convert_segnext_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: SegNextConfig | None = None
) -> tuple[SegNextConfig, dict[str, torch.Tensor], list[str]]:
    """Convert an official SegNeXt (plain or w/ offset learning) state dict.

    Returns:
        ``(config, converted, dropped)``: ``SegNextForSemanticSegmentation(config).load_state_dict(converted)``
        loads strictly; ``dropped`` lists the reference keys left out on purpose (the unused ``conv_seg`` of the
        offset-learning head).

    Raises:
        ConversionError: listing every unknown, missing or wrongly shaped key, by its reference name and ours.
    """
    state_dict = _unwrap(state_dict)
    if config is None:
        config = segnext_config_from_state_dict(state_dict)
    converted: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    dropped: list[str] = []
    unknown: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if config.classifier == "offset_learning" and key.startswith("decode_head.conv_seg."):
            dropped.append(key)
            continue
        try:
            new_key = segnext_key(key)
        except ConversionError:
            unknown[key] = value
            continue
        if new_key.endswith("offset_learning.class_embeddings") and value.ndim == 3:
            value = value.reshape(value.shape[-2:])
        converted[new_key] = value
        sources[new_key] = key
    account_for_keys(converted, expected_shapes(SegNextForSemanticSegmentation, config), sources=sources,
                     unknown=unknown, what=f"{preset_name(config)} ({config.num_labels} classes)")
    return config, converted, dropped


def convert_mscan_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: MscanConfig | None = None
) -> tuple[MscanConfig, dict[str, torch.Tensor], list[str]]:
    """Convert an MSCAN ImageNet backbone state dict (``mscan_t/s/b/l``; a ``backbone.`` prefix is accepted).

    Returns ``(config, converted, dropped)`` for :class:`MscanBackbone`; ``config`` returns stages 2–4 (what the
    SegNeXt head reads); ``dropped`` lists the ImageNet classifier keys (``head.*``).
    """
    state_dict = {k.removeprefix("backbone."): v for k, v in _unwrap(state_dict).items()}
    if config is None:
        config = MscanConfig.from_variant(detect_mscan_variant(state_dict), out_features=["stage2", "stage3", "stage4"])
    converted: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    dropped: list[str] = []
    unknown: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if re.search(IMAGENET_HEAD_PATTERN, key):
            dropped.append(key)
            continue
        try:
            new_key = mscan_key(key)
            converted[new_key], sources[new_key] = value, key
        except ConversionError:
            unknown[key] = value
    account_for_keys(converted, expected_shapes(MscanBackbone, config), sources=sources, unknown=unknown,
                     what=f"MSCAN ({config.hidden_sizes}, depths {config.depths})")
    return config, converted, dropped


__all__ = [
    "convert_mscan_state_dict",
    "convert_segnext_state_dict",
    "detect_mscan_variant",
    "is_mscan_backbone_state_dict",
    "is_segnext_state_dict",
    "mscan_key",
    "preset_name",
    "segnext_config_from_state_dict",
    "segnext_key",
]
