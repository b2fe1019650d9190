"""EfficientFormerV2 ImageNet checkpoints (the authors' ``eformer_*_450.pth`` or timm's ``efficientformerv2_*``)
→ :class:`~offseg_hf.models.modeling_efficientformer_v2.EfficientFormerV2Backbone`, the start of OffSeg training.

timm's names are first renamed to the authors' layout (declarative rules below), then to ours by
:func:`offseg_hf.conversion.keymaps.backbone_key`, the same renaming the OffSeg checkpoints' backbones use.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from offseg_hf.conversion.accounting import ConversionError, account_for_keys, rename
from offseg_hf.conversion.keymaps import backbone_key
from offseg_hf.conversion.reading import read_checkpoint
from offseg_hf.models.configuration_offseg import EFFICIENTFORMER_V2_VARIANTS
from offseg_hf.models.modeling_efficientformer_v2 import EfficientFormerV2Backbone

__all__ = [
    "ATTENTION_BIAS_POLICIES",
    "BackboneLoadReport",
    "detect_backbone_variant",
    "imagenet_to_reference_backbone",
    "is_imagenet_backbone_checkpoint",
    "load_imagenet_backbone_weights",
    "transfer_attention_biases",
]

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
            rest = "attn." + (rename(_TIMM_ATTENTION_RULES, rest[len("attn."):]) or rest[len("attn."):])
        return f"network.{2 * stage - 1}.{rest}"
    match = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$", key)
    if match:
        stage, block, rest = int(match.group(1)), match.group(2), match.group(3)
        if rest in ("ls1.gamma", "ls2.gamma"):
            rest = f"layer_scale_{rest[2]}"
        elif rest.startswith("mlp."):
            rest = rename(_TIMM_MLP_RULES, rest) or rest
        elif rest.startswith("token_mixer."):
            rest = "token_mixer." + (rename(_TIMM_ATTENTION_RULES, rest[len("token_mixer."):]) or rest[len("token_mixer."):])
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
    if attention_biases not in ATTENTION_BIAS_POLICIES:
        raise ValueError(f"attention_biases must be one of {ATTENTION_BIAS_POLICIES}, got {attention_biases!r}")
    backbone = _target_backbone(module)
    source = str(checkpoint) if not isinstance(checkpoint, Mapping) else "state dict"
    state_dict = checkpoint if isinstance(checkpoint, Mapping) else read_checkpoint(checkpoint)[0]
    weights, tables, dropped, layout = imagenet_to_reference_backbone(state_dict)

    ours = backbone.state_dict()
    target: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    unknown: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for reference, value in weights.items():
        try:
            key = backbone_key(reference)
        except ConversionError:
            unknown[reference] = value
            continue
        target[key], sources[key] = value, reference
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
            continue  # reported as a missing key
        used_tables.add(prefix)
        table = tables[prefix]
        grid = round(ours[key].shape[1] ** 0.5)
        target[key] = table if table.shape == ours[key].shape else transfer_attention_biases(table, grid)
        sources[key] = f"{prefix}.attention_biases"
    if attention_biases == "zero":
        dropped = sorted(dropped + [p + ".attention_biases" for p in tables])
    else:
        problems.extend(f"unexpected key {p}.attention_biases: no attention of this backbone uses it"
                        for p in sorted(set(tables) - used_tables))
    widths = [v.shape[0] for k, v in weights.items() if re.match(r"^(patch_embed\.3|network\.[135]\.(proj|conv))\.weight$", k)]
    try:
        account_for_keys(
            target, {key: value.shape for key, value in ours.items()}, sources=sources, unknown=unknown, problems=problems,
            what=f"this EfficientFormerV2 backbone (hidden_sizes {list(backbone.config.hidden_sizes)}, depths "
            f"{list(backbone.config.depths)})",
            target="backbone",
        )
    except ConversionError as error:
        raise ConversionError(f"{source} ({layout} layout, stage widths {widths}): {error}") from None
    backbone.load_state_dict(target, strict=True)
    return BackboneLoadReport(layout, attention_biases, sorted(target), dropped, zeroed)


def is_imagenet_backbone_checkpoint(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict is an EfficientFormerV2 ImageNet classifier (authors' or timm layout)."""
    keys = [k.removeprefix("module.") for k in state_dict]
    return any(k.startswith(("patch_embed.", "network.")) for k in keys) or (
        any(k.startswith("stem.conv1.") for k in keys) and any(k.startswith("stages.") for k in keys)
    )


def detect_backbone_variant(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The EfficientFormerV2 variant (``"s0"``, ``"s1"``, ``"s2"``, ``"l"``) of an ImageNet state dict,
    from its stage widths and block counts."""
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
