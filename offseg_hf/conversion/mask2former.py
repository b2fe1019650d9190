"""Official Mask2Former (+ offset learning) checkpoints → transformers' Mask2Former on transformers' Swin.

mmsegmentation's ``EncoderDecoder(SwinTransformer, Mask2FormerHead)`` and the OffSeg authors'
``Mask2FormerHeadOffsetLearning`` (the same head plus ``decode_head.offset_learning.*``) become
:class:`~transformers.Mask2FormerForUniversalSegmentation` /
:class:`~offseg_hf.models.modeling_mask2former_offset.Mask2FormerOffsetForUniversalSegmentation`. The architecture
(Swin width, depths, heads, window; head width, queries, layers, classes) is read from the tensor shapes
(:func:`mask2former_config_from_state_dict`), so every Swin size of this layout converts. Every key is accounted for:

* renamed (:func:`mask2former_key`), e.g. ``decode_head.transformer_decoder.layers.0.norms.0.weight`` →
  ``model.transformer_module.decoder.layers.0.cross_attn_layer_norm.weight`` (mmdet's post-norm layer normalises
  after cross-attention, self-attention and FFN, in that order; its state dict lists ``self_attn`` first);
* split: Swin's fused ``attn.w_msa.qkv`` and the decoder self-attention's packed ``in_proj_weight`` / ``in_proj_bias``
  `(3C, …)` → ``q_proj`` / ``k_proj`` / ``v_proj`` (rows q | k | v); the cross-attention stays packed (an
  ``nn.MultiheadAttention`` on both sides);
* permuted: Swin patch merging concatenates the 2×2 neighbours channel-major in mmseg (``nn.Unfold``: column
  ``c·4 + (row·2 + col)``) and neighbour-major in transformers (``[x(0,0), x(1,0), x(0,1), x(1,1)]`` blocks of C), so
  ``downsample.reduction.weight``'s columns and ``downsample.norm``'s entries are reordered (:func:`merge_order`);
* derived and checked, then dropped: each ``relative_position_index`` (transformers builds the same buffer);
* provided by the model, not by the checkpoint: ``criterion.empty_weight`` (the loss's class weights, a buffer
  built from ``no_object_weight``) and ``…encoder.swin.layernorm.*``, the final LayerNorm of transformers'
  ``SwinModel`` that ``SwinBackbone`` holds but never applies (ones / zeros, as transformers initialises it).

Anything else (unknown, missing or wrongly shaped keys) raises
:class:`~offseg_hf.conversion.accounting.ConversionError` naming every culprit; a checkpoint whose backbone is not
Swin, or whose head is not Mask2Former, is refused with what was found.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation
from transformers.models.swin.modeling_swin import SwinRelativePositionBias

from offseg_hf.conversion.accounting import ConversionError, account_for_keys, rename
from offseg_hf.models.modeling_mask2former_offset import (
    SWIN_SIZES,
    Mask2FormerOffsetForUniversalSegmentation,
    mask2former_swin_config,
)

# The head's fixed geometry (mmdet's MSDeformAttnPixelDecoder and transformers alike): 3 levels × 4 points.
_DEFORMABLE_LEVELS, _DEFORMABLE_POINTS = 3, 4

_SWIN = "model.pixel_level_module.encoder."
_PIXEL_DECODER = "model.pixel_level_module.decoder."
_DECODER = "model.transformer_module.decoder."

_BACKBONE_RULES = [
    (r"^patch_embed\.projection\.", "swin.embeddings.patch_embeddings.projection."),
    (r"^patch_embed\.norm\.", "swin.embeddings.norm."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.norm1\.", r"swin.encoder.layers.\1.blocks.\2.layernorm_before."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.norm2\.", r"swin.encoder.layers.\1.blocks.\2.layernorm_after."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.relative_position_bias_table$",
     r"swin.encoder.layers.\1.blocks.\2.attention.relative_position_bias.relative_position_bias_table"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.proj\.", r"swin.encoder.layers.\1.blocks.\2.attention.o_proj."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.0\.0\.", r"swin.encoder.layers.\1.blocks.\2.mlp.fc1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.1\.", r"swin.encoder.layers.\1.blocks.\2.mlp.fc2."),
    (r"^stages\.(\d+)\.downsample\.(norm|reduction)\.", r"swin.encoder.layers.\1.downsample.\2."),
    (r"^norm(\d)\.", lambda m: f"hidden_states_norms.stage{int(m.group(1)) + 1}."),
]
_SWIN_QKV = re.compile(r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.qkv\.(weight|bias)$")
_SWIN_POSITION_INDEX = re.compile(r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.relative_position_index$")

_HEAD_RULES = [
    (r"^pixel_decoder\.input_convs\.(\d+)\.conv\.", _PIXEL_DECODER + r"input_projections.\1.0."),
    (r"^pixel_decoder\.input_convs\.(\d+)\.gn\.", _PIXEL_DECODER + r"input_projections.\1.1."),
    (r"^pixel_decoder\.encoder\.layers\.(\d+)\.self_attn\.", _PIXEL_DECODER + r"encoder.layers.\1.self_attn."),
    (r"^pixel_decoder\.encoder\.layers\.(\d+)\.ffn\.layers\.0\.0\.", _PIXEL_DECODER + r"encoder.layers.\1.fc1."),
    (r"^pixel_decoder\.encoder\.layers\.(\d+)\.ffn\.layers\.1\.", _PIXEL_DECODER + r"encoder.layers.\1.fc2."),
    (r"^pixel_decoder\.encoder\.layers\.(\d+)\.norms\.0\.", _PIXEL_DECODER + r"encoder.layers.\1.self_attn_layer_norm."),
    (r"^pixel_decoder\.encoder\.layers\.(\d+)\.norms\.1\.", _PIXEL_DECODER + r"encoder.layers.\1.final_layer_norm."),
    (r"^pixel_decoder\.level_encoding\.weight$", _PIXEL_DECODER + "level_embed"),
    (r"^pixel_decoder\.lateral_convs\.(\d+)\.conv\.", lambda m: f"{_PIXEL_DECODER}adapter_{int(m.group(1)) + 1}.0."),
    (r"^pixel_decoder\.lateral_convs\.(\d+)\.gn\.", lambda m: f"{_PIXEL_DECODER}adapter_{int(m.group(1)) + 1}.1."),
    (r"^pixel_decoder\.output_convs\.(\d+)\.conv\.", lambda m: f"{_PIXEL_DECODER}layer_{int(m.group(1)) + 1}.0."),
    (r"^pixel_decoder\.output_convs\.(\d+)\.gn\.", lambda m: f"{_PIXEL_DECODER}layer_{int(m.group(1)) + 1}.1."),
    (r"^pixel_decoder\.mask_feature\.", _PIXEL_DECODER + "mask_projection."),
    (r"^transformer_decoder\.layers\.(\d+)\.self_attn\.attn\.out_proj\.", _DECODER + r"layers.\1.self_attn.out_proj."),
    (r"^transformer_decoder\.layers\.(\d+)\.cross_attn\.attn\.", _DECODER + r"layers.\1.cross_attn."),
    (r"^transformer_decoder\.layers\.(\d+)\.ffn\.layers\.0\.0\.", _DECODER + r"layers.\1.fc1."),
    (r"^transformer_decoder\.layers\.(\d+)\.ffn\.layers\.1\.", _DECODER + r"layers.\1.fc2."),
    (r"^transformer_decoder\.layers\.(\d+)\.norms\.0\.", _DECODER + r"layers.\1.cross_attn_layer_norm."),
    (r"^transformer_decoder\.layers\.(\d+)\.norms\.1\.", _DECODER + r"layers.\1.self_attn_layer_norm."),
    (r"^transformer_decoder\.layers\.(\d+)\.norms\.2\.", _DECODER + r"layers.\1.final_layer_norm."),
    (r"^transformer_decoder\.post_norm\.", _DECODER + "layernorm."),
    (r"^query_embed\.weight$", "model.transformer_module.queries_embedder.weight"),
    (r"^query_feat\.weight$", "model.transformer_module.queries_features.weight"),
    (r"^level_embed\.weight$", "model.transformer_module.level_embed.weight"),
    (r"^cls_embed\.", "class_predictor."),
    (r"^mask_embed\.([024])\.", lambda m: f"{_DECODER}mask_predictor.mask_embedder.{int(m.group(1)) // 2}.0."),
    (r"^offset_learning\.cls_offset_proj\.", _DECODER + "mask_predictor.offset_learning.class_offset_proj."),
    (r"^offset_learning\.feat_offset_proj\.", _DECODER + "mask_predictor.offset_learning.feature_offset_proj."),
]
_DECODER_SELF_ATTENTION = re.compile(r"^decode_head\.transformer_decoder\.layers\.(\d+)\.self_attn\.attn\.in_proj_(weight|bias)$")

# Keys the model holds that no checkpoint has (see the module docstring).
_UNUSED_SWIN_NORM = _SWIN + "swin.layernorm."
_LOSS_WEIGHTS = "criterion.empty_weight"

# The 2×2 neighbour order of transformers' patch merging in mmseg's nn.Unfold numbering (kernel row·2 + col).
_MERGE_NEIGHBOURS = [0, 2, 1, 3]


def mask2former_key(key: str) -> str:
    """Reference key → key of transformers' Mask2Former (not for the packed q/k/v, nor the position indices)."""
    if key.startswith("backbone."):
        new = rename(_BACKBONE_RULES, key[len("backbone."):])
        prefix = _SWIN
    elif key.startswith("decode_head."):
        new = rename(_HEAD_RULES, key[len("decode_head."):])
        prefix = ""
    else:
        new = None
    if new is None:
        raise ConversionError(f"unknown key {key!r}")
    return prefix + new


def merge_order(value: torch.Tensor) -> torch.Tensor:
    """mmseg's patch-merging channel order ``c·4 + k`` → transformers' ``k'·C + c`` along the last axis (4C).

    ``k`` is the ``nn.Unfold`` kernel position (row·2 + col); transformers concatenates the neighbours as
    (0,0), (1,0), (0,1), (1,1), i.e. ``k = [0, 2, 1, 3][k']``. For ``reduction.weight`` `(2C, 4C)` and
    ``norm.weight`` / ``norm.bias`` `(4C,)`.
    """
    channels = value.shape[-1] // 4
    grouped = value.reshape(*value.shape[:-1], channels, 4)[..., _MERGE_NEIGHBOURS]
    return grouped.transpose(-1, -2).reshape(value.shape).contiguous()


def has_mask2former_head(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a reference state dict has mmdet's ``Mask2FormerHead`` (plain or with offset learning)."""
    return "decode_head.query_feat.weight" in state_dict and any(
        key.startswith("decode_head.transformer_decoder.") for key in state_dict
    )


def has_swin_backbone(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a reference state dict has mmseg's ``SwinTransformer`` backbone."""
    return "backbone.patch_embed.projection.weight" in state_dict and any(
        _SWIN_QKV.match(key) for key in state_dict
    )


def is_mask2former_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``offseg convert`` should treat a state dict as this family: a Mask2Former head or a Swin backbone.

    Either half is enough, so that a Swin backbone under another head, or a Mask2Former head on another backbone,
    reaches :func:`check_supported` and gets an error naming what it has.
    """
    return has_mask2former_head(state_dict) or has_swin_backbone(state_dict)


def _describe(keys: list[str], what: str) -> str:
    shown = ", ".join(repr(key) for key in keys[:3]) or "none"
    return f"{what} keys: {shown}{', …' if len(keys) > 3 else ''} ({len(keys)} in all)"


_HEAD_MARKERS = (("psp_modules", "UPerNet (UPerHead)"), ("fpn_convs", "UPerNet (UPerHead)"),
                 ("aspp", "DeepLabV3(+) (ASPPHead)"), ("hamburger", "SegNeXt (LightHamHead)"),
                 ("predictor.", "MaskFormer (MaskFormerHead)"), ("offset_learning.cls_repr", "an OffSeg head"))
_BACKBONE_MARKERS = (("backbone.layer1.", "ResNet"), ("backbone.stem.", "ResNet (V1c stem)"),
                     ("backbone.layers.0.0.projection", "MiT (SegFormer)"), ("backbone.block1.", "MSCAN"),
                     ("backbone.network.", "EfficientFormerV2"), ("backbone.downsample_layers.", "ConvNeXt"))


def _guess(keys: list[str], markers: tuple[tuple[str, str], ...], what: str) -> str:
    """The architecture whose marker appears in ``keys`` (``what``: "head" / "backbone", for the fallbacks)."""
    names = " ".join(keys)
    return next((name for marker, name in markers if marker in names), f"an unknown {what}" if keys else f"no {what}")


def check_supported(state_dict: Mapping[str, torch.Tensor]) -> None:
    """Refuse, naming what was found, a checkpoint that is not a Swin backbone under a Mask2Former head."""
    backbone = [key for key in state_dict if key.startswith("backbone.")]
    head = [key for key in state_dict if key.startswith("decode_head.")]
    problems = []
    if not has_swin_backbone(state_dict):
        problems.append(
            f"its backbone is not Swin but looks like {_guess(backbone, _BACKBONE_MARKERS, 'backbone')} "
            f"({_describe(backbone, 'backbone')}); "
            "Mask2Former converts with mmseg's SwinTransformer only ('backbone.patch_embed.projection.weight', "
            "'backbone.stages.N.blocks.M.attn.w_msa.qkv.weight', …)"
        )
    if not has_mask2former_head(state_dict):
        problems.append(
            f"its head is not Mask2Former but looks like {_guess(head, _HEAD_MARKERS, 'head')} "
            f"({_describe(head, 'decode_head')}); "
            "only mmdet's Mask2FormerHead and the OffSeg authors' Mask2FormerHeadOffsetLearning convert "
            "('decode_head.query_feat.weight', 'decode_head.transformer_decoder.*', …)"
        )
    if problems:
        raise ConversionError("unsupported Mask2Former / Swin checkpoint: " + "; and ".join(problems))


def _indices(state_dict: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for key in state_dict if (m := re.match(pattern, key))})


def mask2former_config_from_state_dict(state_dict: Mapping[str, torch.Tensor], **fields) -> Mask2FormerConfig:
    """The architecture of a reference Mask2Former (+ offset learning) state dict, read from its shapes.

    Swin: width (patch embedding), depths (blocks per stage), heads (relative position tables), window
    (table rows = (2w − 1)²), MLP ratio, patch size, q/k/v bias. Head: widths, queries, classes (``cls_embed`` rows
    − 1, the no-object class), pixel-decoder and decoder layers (``decoder_layers`` = mmdet's ``num_layers`` + 1) and
    FFN widths, attention heads (deformable sampling offsets = heads × 3 levels × 4 points × 2). Offset learning when
    ``decode_head.offset_learning.*`` is present. ``fields`` override any head field (e.g. ``id2label``).
    """
    check_supported(state_dict)
    sd = state_dict
    projection = sd["backbone.patch_embed.projection.weight"]
    stages = _indices(sd, r"^backbone\.stages\.(\d+)\.blocks\.0\.norm1\.weight$")
    depths = [len(_indices(sd, rf"^backbone\.stages\.{stage}\.blocks\.(\d+)\.norm1\.weight$")) for stage in stages]
    tables = [sd[f"backbone.stages.{stage}.blocks.0.attn.w_msa.relative_position_bias_table"] for stage in stages]
    window_size = (math.isqrt(int(tables[0].shape[0])) + 1) // 2
    embed_dim = int(projection.shape[0])
    swin = {
        "embed_dim": embed_dim,
        "depths": depths,
        "num_heads": [int(table.shape[1]) for table in tables],
        "window_size": window_size,
        "patch_size": int(projection.shape[-1]),
        "mlp_ratio": int(sd["backbone.stages.0.blocks.0.ffn.layers.0.0.weight"].shape[0]) / embed_dim,
        "qkv_bias": "backbone.stages.0.blocks.0.attn.w_msa.qkv.bias" in sd,
        "out_features": [f"stage{stage + 1}" for stage in stages],
    }
    offsets = sd["decode_head.pixel_decoder.encoder.layers.0.self_attn.sampling_offsets.weight"]
    query_feat = sd["decode_head.query_feat.weight"]
    head = {
        "hidden_dim": int(query_feat.shape[1]),
        "num_queries": int(query_feat.shape[0]),
        "feature_size": int(sd["decode_head.pixel_decoder.input_convs.0.conv.weight"].shape[0]),
        "mask_feature_size": int(sd["decode_head.pixel_decoder.mask_feature.weight"].shape[0]),
        "encoder_layers": len(_indices(sd, r"^decode_head\.pixel_decoder\.encoder\.layers\.(\d+)\.")),
        "encoder_feedforward_dim": int(sd["decode_head.pixel_decoder.encoder.layers.0.ffn.layers.0.0.weight"].shape[0]),
        "decoder_layers": len(_indices(sd, r"^decode_head\.transformer_decoder\.layers\.(\d+)\.")) + 1,
        "dim_feedforward": int(sd["decode_head.transformer_decoder.layers.0.ffn.layers.0.0.weight"].shape[0]),
        "num_attention_heads": int(offsets.shape[0]) // (_DEFORMABLE_LEVELS * _DEFORMABLE_POINTS * 2),
    }
    head.update(fields)
    return mask2former_swin_config(
        swin,
        num_labels=int(sd["decode_head.cls_embed.weight"].shape[0]) - 1,
        offset_learning=any(key.startswith("decode_head.offset_learning.") for key in sd),
        **head,
    )


def swin_size(config: Mask2FormerConfig) -> str | None:
    """The name in :data:`SWIN_SIZES` (``"swin-t"``, …) of a configuration's backbone, or `None` for another size."""
    swin = config.backbone_config
    for size, (embed_dim, depths, num_heads, _) in SWIN_SIZES.items():
        if (swin.embed_dim, tuple(swin.depths), tuple(swin.num_heads)) == (embed_dim, depths, num_heads):
            return size
    return None


def preset_name(config: Mask2FormerConfig) -> str:
    """``mask2former-swin-t-offset``, ``mask2former-swin-t``, …; another Swin size is named by its width and depths
    (``mask2former-swin-32-2-2-2-2-offset``)."""
    swin = config.backbone_config
    size = swin_size(config) or f"swin-{swin.embed_dim}-{'-'.join(map(str, swin.depths))}"
    return f"mask2former-{size}" + ("-offset" if config.model_type == "mask2former_offset" else "")


def model_class_for(config: Mask2FormerConfig) -> type:
    """The model a configuration of :func:`mask2former_config_from_state_dict` builds."""
    return (Mask2FormerOffsetForUniversalSegmentation if config.model_type == "mask2former_offset"
            else Mask2FormerForUniversalSegmentation)


def _split_rows(value: torch.Tensor, base: str, kind: str, source: str) -> dict[str, torch.Tensor]:
    if value.shape[0] % 3:
        raise ConversionError(f"{source}: packed q/k/v of shape {tuple(value.shape)} is not divisible by 3")
    query, key, value_ = value.chunk(3, dim=0)
    return {f"{base}.q_proj.{kind}": query, f"{base}.k_proj.{kind}": key, f"{base}.v_proj.{kind}": value_}


def convert_mask2former_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Mask2FormerConfig | None = None
) -> tuple[Mask2FormerConfig, dict[str, torch.Tensor], list[str]]:
    """Convert a reference Mask2Former (+ offset learning) state dict.

    Args:
        state_dict: the reference ``state_dict`` (``backbone.*`` Swin keys, ``decode_head.*`` head keys).
        config: the target configuration; read from the shapes when omitted
            (:func:`mask2former_config_from_state_dict`).

    Returns:
        ``(config, converted, dropped)``: ``model_class_for(config)(config).load_state_dict(converted)`` loads
        strictly; ``dropped`` are the checkpoint keys checked and left out (the Swin position indices).

    Raises:
        ConversionError: an unsupported backbone / head, or every unknown, missing or wrongly shaped key.
    """
    if config is None:
        config = mask2former_config_from_state_dict(state_dict)
    else:
        check_supported(state_dict)
    with torch.device("meta"):
        reference = model_class_for(config)(config)
    expected = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    index_buffers = {key: value for key, value in reference.named_buffers() if key.endswith("relative_position_index")}
    converted: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    unknown: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    dropped: list[str] = []
    for key, value in state_dict.items():
        if match := _SWIN_QKV.match(key):
            stage, block, kind = match.groups()
            split = _split_rows(value, f"{_SWIN}swin.encoder.layers.{stage}.blocks.{block}.attention", kind, key)
        elif match := _DECODER_SELF_ATTENTION.match(key):
            layer, kind = match.groups()
            split = _split_rows(value, f"{_DECODER}layers.{layer}.self_attn", kind, key)
        elif match := _SWIN_POSITION_INDEX.match(key):
            ours = f"{_SWIN}swin.encoder.layers.{match.group(1)}.blocks.{match.group(2)}.attention.relative_position_bias.relative_position_index"
            if ours not in index_buffers:
                unknown[key] = value
            elif not torch.equal(value.long().flatten(), _relative_position_index(config.backbone_config.window_size)):
                problems.append(f"{key!r} differs from the standard Swin relative position index the model builds")
            else:
                dropped.append(key)
            continue
        else:
            try:
                new_key = mask2former_key(key)
            except ConversionError:
                unknown[key] = value
                continue
            if re.search(r"\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)$", new_key):
                value = merge_order(value)
            split = {new_key: value}
        converted.update(split)
        sources.update(dict.fromkeys(split, key))
    # Provided by the model itself (module docstring): the unused final Swin LayerNorm and the loss's class weights.
    for key, shape in expected.items():
        if key.startswith(_UNUSED_SWIN_NORM):
            converted[key] = torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
    weights = torch.ones(config.num_labels + 1)
    weights[-1] = config.no_object_weight
    converted[_LOSS_WEIGHTS] = weights
    kind = "Mask2Former + offset learning" if config.model_type == "mask2former_offset" else "Mask2Former"
    account_for_keys(converted, expected, sources=sources, unknown=unknown, problems=problems, what=kind)
    return config, converted, dropped


def _relative_position_index(window_size: int) -> torch.Tensor:
    """The (flat) relative position index transformers' Swin builds for a ``window_size``² window."""
    return SwinRelativePositionBias(1, (window_size, window_size)).relative_position_index


__all__ = [
    "check_supported",
    "convert_mask2former_state_dict",
    "has_mask2former_head",
    "has_swin_backbone",
    "is_mask2former_state_dict",
    "mask2former_config_from_state_dict",
    "mask2former_key",
    "merge_order",
    "model_class_for",
    "preset_name",
    "swin_size",
]
