"""Official "SegFormer w/ Offset Learning" checkpoints → :class:`SegformerOffsetForSemanticSegmentation`.

The official checkpoints (OffSeg's mmsegmentation fork) hold a MiT encoder (``backbone.layers.*``) and the
SegFormer head with offset learning (``decode_head.*``). Every key is accounted for:

* renamed (:func:`segformer_offset_key`), e.g. ``decode_head.fusion_conv.conv.weight`` →
  ``decode_head.linear_fuse.weight``; 1×1 convolutions of the Mix-FFN become ``Linear`` weights;
* split: each attention's packed ``attn.in_proj_weight`` / ``in_proj_bias`` `(3C, C)` / `(3C,)` become
  ``q_proj`` / ``k_proj`` / ``v_proj``;
* reshaped: ``offset_learning.cls_repr`` `(1, K, C)` → ``class_embeddings`` `(K, C)`;
* dropped, explicitly: ``decode_head.conv_seg.*``, the per-pixel classifier the reference head declares but
  never uses.

Anything else (unknown keys, missing keys, shape mismatches) raises
:class:`~offseg_hf.conversion.accounting.ConversionError` naming every culprit.

The converted model uses ``decode_head_style="reference"`` (per-level conv + BatchNorm + ReLU, fine-to-coarse
concatenation) and ``encoder_layer_norm_eps=1e-6`` (the MiT value), which reproduce the reference logits.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from offseg_hf.conversion.accounting import ConversionError, account_for_keys, expected_shapes, rename
from offseg_hf.models.modeling_segformer_offset import SegformerOffsetConfig, SegformerOffsetForSemanticSegmentation

# MiT attention heads per stage: the same for every published size (B0–B5); not recoverable from the weights.
MIT_NUM_ATTENTION_HEADS = [1, 2, 5, 8]
MIT_STRIDES = [4, 2, 2, 2]
MIT_LAYER_NORM_EPS = 1e-6

DROPPED_KEY_PATTERNS = (r"^decode_head\.conv_seg\.(weight|bias)$",)

_BACKBONE_RULES: list[tuple[str, str]] = [
    (r"^layers\.(\d+)\.0\.projection\.", r"stages.\1.patch_embeddings.proj."),
    (r"^layers\.(\d+)\.0\.norm\.", r"stages.\1.patch_embeddings.layer_norm."),
    (r"^layers\.(\d+)\.1\.(\d+)\.norm1\.", r"stages.\1.blocks.\2.layernorm_before."),
    (r"^layers\.(\d+)\.1\.(\d+)\.norm2\.", r"stages.\1.blocks.\2.layernorm_after."),
    (r"^layers\.(\d+)\.1\.(\d+)\.attn\.attn\.out_proj\.", r"stages.\1.blocks.\2.attention.o_proj."),
    (r"^layers\.(\d+)\.1\.(\d+)\.attn\.sr\.", r"stages.\1.blocks.\2.attention.sequence_reduction.sequence_reduction."),
    (r"^layers\.(\d+)\.1\.(\d+)\.attn\.norm\.", r"stages.\1.blocks.\2.attention.sequence_reduction.layer_norm."),
    (r"^layers\.(\d+)\.1\.(\d+)\.ffn\.layers\.0\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"^layers\.(\d+)\.1\.(\d+)\.ffn\.layers\.1\.", r"stages.\1.blocks.\2.mlp.dwconv.dwconv."),
    (r"^layers\.(\d+)\.1\.(\d+)\.ffn\.layers\.4\.", r"stages.\1.blocks.\2.mlp.fc2."),
    (r"^layers\.(\d+)\.2\.", r"stages.\1.layer_norm."),
]
_PACKED_ATTENTION = re.compile(r"^layers\.(\d+)\.1\.(\d+)\.attn\.attn\.in_proj_(weight|bias)$")

_HEAD_RULES: list[tuple[str, str]] = [
    (r"^decode_head\.convs\.(\d+)\.conv\.", r"decode_head.linear_projections.\1.conv."),
    (r"^decode_head\.convs\.(\d+)\.bn\.", r"decode_head.linear_projections.\1.batch_norm."),
    (r"^decode_head\.fusion_conv\.conv\.", "decode_head.linear_fuse."),
    (r"^decode_head\.fusion_conv\.bn\.", "decode_head.batch_norm."),
    (r"^decode_head\.offset_learning\.cls_repr$", "decode_head.offset_learning.class_embeddings"),
    (r"^decode_head\.offset_learning\.cls_offset_proj\.", "decode_head.offset_learning.class_offset_proj."),
    (r"^decode_head\.offset_learning\.feat_offset_proj\.", "decode_head.offset_learning.feature_offset_proj."),
    (r"^decode_head\.offset_learning\.mask_norm\.", "decode_head.offset_learning.mask_norm."),
]

# Mix-FFN 1×1 convolutions that are Linear layers on our side: (out, in, 1, 1) -> (out, in).
_SQUEEZE = re.compile(r"\.mlp\.fc[12]\.weight$")


def segformer_offset_key(key: str) -> str:
    """Reference key → key of :class:`SegformerOffsetForSemanticSegmentation` (not for the packed q/k/v)."""
    rules = _HEAD_RULES
    prefix = ""
    if key.startswith("backbone."):
        key, rules, prefix = key[len("backbone."):], _BACKBONE_RULES, "segformer."
    new = rename(rules, key)
    if new is None:
        raise ConversionError(f"unknown key {key!r}")
    return prefix + new


def is_segformer_offset_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a reference state dict is a SegFormer (MiT) + offset learning checkpoint."""
    return (
        "backbone.layers.0.0.projection.weight" in state_dict
        and "decode_head.fusion_conv.conv.weight" in state_dict
        and "decode_head.offset_learning.cls_repr" in state_dict
    )


def _unwrap(state_dict: Mapping) -> Mapping[str, torch.Tensor]:
    """Accept a full training checkpoint ``{"state_dict": …, "meta": …}`` as well as a bare state dict."""
    inner = state_dict.get("state_dict") if isinstance(state_dict, Mapping) else None
    return inner if isinstance(inner, Mapping) else state_dict


def segformer_offset_config_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], **kwargs
) -> SegformerOffsetConfig:
    """The architecture of a reference SegFormer + offset learning state dict.

    Widths, depths, patch sizes, sequence-reduction ratios, MLP ratios, decoder width and the number of classes
    come from the tensor shapes; attention heads (``[1, 2, 5, 8]``) and strides (``[4, 2, 2, 2]``) are those
    of every published MiT. ``kwargs`` override any field (e.g. ``id2label``).
    """
    state_dict = _unwrap(state_dict)
    if not is_segformer_offset_state_dict(state_dict):
        raise ConversionError(
            "not a SegFormer + offset learning checkpoint: expected 'backbone.layers.0.0.projection.weight', "
            "'decode_head.fusion_conv.conv.weight' and 'decode_head.offset_learning.cls_repr'"
        )
    stages = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"^backbone\.layers\.(\d+)\.0\.projection\.weight$", k))})
    hidden_sizes, patch_sizes, depths, sr_ratios, mlp_ratios = [], [], [], [], []
    for stage in stages:
        projection = state_dict[f"backbone.layers.{stage}.0.projection.weight"]
        hidden_sizes.append(int(projection.shape[0]))
        patch_sizes.append(int(projection.shape[-1]))
        blocks = {int(m.group(1)) for k in state_dict if (m := re.match(rf"^backbone\.layers\.{stage}\.1\.(\d+)\.", k))}
        depths.append(len(blocks))
        reduction = state_dict.get(f"backbone.layers.{stage}.1.0.attn.sr.weight")
        sr_ratios.append(int(reduction.shape[-1]) if reduction is not None else 1)
        fc1 = state_dict[f"backbone.layers.{stage}.1.0.ffn.layers.0.weight"]
        mlp_ratios.append(int(fc1.shape[0]) // int(fc1.shape[1]))
    num_stages = len(stages)
    fields = dict(
        num_encoder_blocks=num_stages,
        hidden_sizes=hidden_sizes,
        depths=depths,
        patch_sizes=patch_sizes,
        sr_ratios=sr_ratios,
        mlp_ratios=mlp_ratios,
        num_attention_heads=MIT_NUM_ATTENTION_HEADS[:num_stages],
        strides=MIT_STRIDES[:num_stages],
        decoder_hidden_size=int(state_dict["decode_head.fusion_conv.conv.weight"].shape[0]),
        num_labels=int(state_dict["decode_head.offset_learning.cls_repr"].shape[-2]),
        decode_head_style="reference",
        encoder_layer_norm_eps=MIT_LAYER_NORM_EPS,
        layer_norm_eps=MIT_LAYER_NORM_EPS,
        classifier_dropout_prob=0.0,
    )
    fields.update(kwargs)
    return SegformerOffsetConfig(**fields)


def _split_packed_attention(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """``in_proj_weight`` `(3C, C)` / ``in_proj_bias`` `(3C,)` → q/k/v projections (in that order)."""
    match = _PACKED_ATTENTION.match(key[len("backbone."):])
    stage, block, kind = match.groups()
    if value.shape[0] % 3:
        raise ConversionError(f"{key}: packed q/k/v of shape {tuple(value.shape)} is not divisible by 3")
    query, key_, value_ = value.chunk(3, dim=0)
    base = f"segformer.stages.{stage}.blocks.{block}.attention"
    return {f"{base}.q_proj.{kind}": query, f"{base}.k_proj.{kind}": key_, f"{base}.v_proj.{kind}": value_}


def convert_segformer_offset_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: SegformerOffsetConfig | None = None
) -> tuple[SegformerOffsetConfig, dict[str, torch.Tensor]]:
    """Convert an official SegFormer + offset learning state dict.

    Args:
        state_dict: the reference ``state_dict`` (``backbone.*`` MiT keys and ``decode_head.*`` keys), or a
            training checkpoint holding it under ``"state_dict"``.
        config: the target configuration; inferred from the shapes when omitted
            (:func:`segformer_offset_config_from_state_dict`).

    Returns:
        ``(config, converted)``: ``SegformerOffsetForSemanticSegmentation(config).load_state_dict(converted)``
        loads strictly.

    Raises:
        ConversionError: listing every unknown, missing or wrongly shaped key.
    """
    state_dict = _unwrap(state_dict)
    if config is None:
        config = segformer_offset_config_from_state_dict(state_dict)
    converted: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    unknown: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if any(re.search(pattern, key) for pattern in DROPPED_KEY_PATTERNS):
            continue
        if key.startswith("backbone.") and _PACKED_ATTENTION.match(key[len("backbone."):]):
            split = _split_packed_attention(key, value)
            converted.update(split)
            sources.update(dict.fromkeys(split, key))
            continue
        try:
            new_key = segformer_offset_key(key)
        except ConversionError:
            unknown[key] = value
            continue
        if _SQUEEZE.search(new_key) and value.ndim == 4:
            value = value.reshape(value.shape[:2])
        if new_key.endswith("offset_learning.class_embeddings") and value.ndim == 3:
            value = value.reshape(value.shape[-2:])
        converted[new_key], sources[new_key] = value, key
    account_for_keys(converted, expected_shapes(SegformerOffsetForSemanticSegmentation, config), sources=sources,
                     unknown=unknown, what="SegFormer + offset learning")
    return config, converted


__all__ = [
    "DROPPED_KEY_PATTERNS",
    "MIT_NUM_ATTENTION_HEADS",
    "convert_segformer_offset_state_dict",
    "is_segformer_offset_state_dict",
    "segformer_offset_config_from_state_dict",
    "segformer_offset_key",
]
