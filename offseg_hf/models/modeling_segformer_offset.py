"""SegFormer with offset learning in place of its 1×1 classifier (paper Sec. 4, "SegFormer w/ Offset Learning").

The paper replaces SegFormer's per-pixel classifier ``M = W·Eᵀ`` by offset learning (Eq. 4–13): the fused
decoder feature E `(B, D, H/4, W/4)` is 2×2 max-pooled to `(B, D, H/8, W/8)` and
:class:`~offseg_hf.models.offset_learning.OffsetLearning` turns it into logits `(B, K, H/8, W/8)`.

Two decoder styles share this module (``SegformerOffsetConfig.decode_head_style``):

* ``"transformers"`` — the head of transformers' :class:`~transformers.SegformerForSemanticSegmentation`:
  per-level ``Linear`` (with bias), concatenation from the coarsest to the finest level. This is what
  :func:`offseg_hf.add_offset_learning` produces from an existing SegFormer, whose weights carry over 1:1.
* ``"reference"`` — the head of the original OffSeg release: per-level 1×1 conv (no bias) + BatchNorm + ReLU,
  concatenation from the finest to the coarsest level. Converted official checkpoints use this style.

Both then fuse with a 1×1 conv (no bias) + BatchNorm + ReLU. The saved ``config.json`` has
``model_type: "segformer_offset"``, so ``AutoModelForSemanticSegmentation.from_pretrained`` rebuilds this
class (with ``offseg_hf`` imported, or from the shipped code with ``trust_remote_code=True``).
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import initialization as init
from transformers.backbone_utils import filter_output_hidden_states
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.models.segformer.configuration_segformer import SegformerConfig
from transformers.models.segformer.modeling_segformer import (
    SegformerMLP,
    SegformerModel,
    SegformerPreTrainedModel,
)
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple

from .loss import semantic_segmentation_loss
from .offset_learning import OffsetLearning, check_num_labels

DECODE_HEAD_STYLES = ("transformers", "reference")

# Config keys describing a saved model rather than the architecture; dropped when re-typing a config.
_NON_ARCHITECTURE_KEYS = ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path")


@strict
class SegformerOffsetConfig(SegformerConfig):
    r"""
    Configuration of [`SegformerOffsetForSemanticSegmentation`]: every [`SegformerConfig`] field plus

    Args:
        decode_head_style (`str`, defaults to `"transformers"`): `"transformers"` (per-level Linear, coarse-to-fine
            concatenation, as transformers' SegFormer) or `"reference"` (per-level 1×1 conv + BatchNorm + ReLU,
            fine-to-coarse concatenation, as the original OffSeg SegFormer head).
        offset_learning_pool_size (`int`, defaults to 2): kernel and stride of the max-pool applied to the fused
            feature before offset learning (2 → logits at 1/8 resolution; 1 disables the pooling).
        offset_learning_init_std (`float`, defaults to 0.02): std of the truncated-normal init of the class
            embeddings W and of both offset projections.
        encoder_layer_norm_eps (`float`, *optional*): epsilon of every LayerNorm of the MiT encoder. `None` keeps
            what transformers' `SegformerModel` builds (1e-5, whatever `layer_norm_eps` says); the original MiT
            uses 1e-6, which converted official checkpoints set.
    """

    model_type = "segformer_offset"

    decode_head_style: str = "transformers"
    offset_learning_pool_size: int = 2
    offset_learning_init_std: float = 0.02
    encoder_layer_norm_eps: float | None = None

    def __post_init__(self, **kwargs):
        # A plain SegFormer config.json (model_type "segformer") may be loaded into this class, e.g. by
        # SegformerOffsetForSemanticSegmentation.from_pretrained("nvidia/mit-b0"): keep our own model_type.
        kwargs.pop("model_type", None)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Check the classes and the offset-learning fields."""
        check_num_labels(self.num_labels, "SegFormer + offset learning")
        if self.decode_head_style not in DECODE_HEAD_STYLES:
            raise ValueError(
                f"decode_head_style must be one of {DECODE_HEAD_STYLES}, got {self.decode_head_style!r}"
            )
        if self.offset_learning_pool_size < 1:
            raise ValueError(f"offset_learning_pool_size must be >= 1, got {self.offset_learning_pool_size}")
        if not self.reshape_last_stage:
            raise ValueError("SegFormer + offset learning needs reshape_last_stage=True (a feature map from every stage)")

    @classmethod
    def from_segformer_config(cls, config: SegformerConfig, **kwargs) -> "SegformerOffsetConfig":
        """The offset-learning twin of a plain [`SegformerConfig`] (labels and all fields kept; ``kwargs`` override)."""
        fields = {key: value for key, value in config.to_dict().items() if key not in _NON_ARCHITECTURE_KEYS}
        fields.update(kwargs)
        return cls(**fields)


class SegformerOffsetProjectionConv(nn.Conv2d):
    """1×1 convolution without bias of the reference head's blocks (Kaiming-normal init, fan_out, ReLU)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=1, bias=False)


class SegformerOffsetConvNormAct(nn.Module):
    """1×1 conv (no bias) + BatchNorm + ReLU: `(B, C_in, H, W) -> (B, C_out, H, W)` (reference head blocks)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = SegformerOffsetProjectionConv(in_channels, out_channels)
        self.batch_norm = nn.BatchNorm2d(out_channels)
        self.activation = nn.ReLU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.batch_norm(self.conv(hidden_states)))


class SegformerOffsetLinearProjection(SegformerMLP):
    """transformers' per-level ``Linear`` (same parameter names), returning a map: `(B, C_i, h, w) -> (B, D, h, w)`."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = hidden_states.shape
        return super().forward(hidden_states).transpose(1, 2).reshape(batch, -1, height, width)


class SegformerOffsetDecodeHead(nn.Module):
    """All-MLP SegFormer decoder whose classifier is replaced by max-pool + offset learning.

    ``fuse``: the four encoder maps `(B, C_i, H/2^(i+2), W/2^(i+2))` → per-level projection to D channels →
    bilinear resize to the 1/4 map → concatenation → 1×1 conv + BatchNorm + ReLU → E `(B, D, H/4, W/4)`.

    ``forward``: E → max-pool (``offset_learning_pool_size``) → dropout → offset learning → logits
    `(B, K, H/8, W/8)`.
    """

    def __init__(self, config: SegformerOffsetConfig):
        super().__init__()
        hidden = config.decoder_hidden_size
        self.reverse_levels = config.decode_head_style == "transformers"
        if config.decode_head_style == "transformers":
            projections = [SegformerOffsetLinearProjection(config, size) for size in config.hidden_sizes]
        else:
            projections = [SegformerOffsetConvNormAct(size, hidden) for size in config.hidden_sizes]
        self.linear_projections = nn.ModuleList(projections[: config.num_encoder_blocks])
        self.linear_fuse = nn.Conv2d(hidden * config.num_encoder_blocks, hidden, kernel_size=1, bias=False)
        self.batch_norm = nn.BatchNorm2d(hidden)
        self.activation = nn.ReLU()
        pool = config.offset_learning_pool_size
        self.pool = nn.MaxPool2d(pool, pool) if pool > 1 else nn.Identity()
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        self.offset_learning = OffsetLearning(hidden, config.num_labels)

    def fuse(self, encoder_hidden_states: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Fused decoder feature `(B, D, H/4, W/4)` from the encoder stage outputs (finest first)."""
        if len(encoder_hidden_states) != len(self.linear_projections):
            raise ValueError(
                f"the decode head expects {len(self.linear_projections)} encoder maps, got {len(encoder_hidden_states)}"
            )
        size = encoder_hidden_states[0].shape[-2:]
        levels = [
            nn.functional.interpolate(projection(state), size=size, mode="bilinear", align_corners=False)
            for state, projection in zip(encoder_hidden_states, self.linear_projections)
        ]
        if self.reverse_levels:
            levels = levels[::-1]
        return self.activation(self.batch_norm(self.linear_fuse(torch.cat(levels, dim=1))))

    def pooled(self, encoder_hidden_states) -> torch.Tensor:
        """The input of offset learning: the max-pooled fused feature `(B, D, H/8, W/8)`."""
        return self.pool(self.fuse(encoder_hidden_states))

    def forward(self, encoder_hidden_states) -> torch.Tensor:
        return self.offset_learning(self.dropout(self.pooled(encoder_hidden_states)))


class SegformerOffsetForSemanticSegmentation(SegformerPreTrainedModel):
    """SegFormer (MiT encoder + all-MLP decoder) with offset learning: `pixel_values (B, 3, H, W)` → logits
    `(B, K, H/8, W/8)` (`H/4` with ``offset_learning_pool_size=1``).

    Parameter names match transformers' `SegformerForSemanticSegmentation` except the classifier
    (``decode_head.classifier.*``), which is replaced by ``decode_head.offset_learning.*``: a plain SegFormer
    checkpoint loads into the ``"transformers"`` style with only the offset-learning weights newly initialised.

    Example:

    ```python
    >>> from offseg_hf.models.modeling_segformer_offset import SegformerOffsetConfig, SegformerOffsetForSemanticSegmentation
    >>> model = SegformerOffsetForSemanticSegmentation(SegformerOffsetConfig(num_labels=19)).eval()
    >>> model(torch.randn(1, 3, 128, 160)).logits.shape
    torch.Size([1, 19, 16, 20])
    ```
    """

    config_class = SegformerOffsetConfig
    config: SegformerOffsetConfig

    def __init__(self, config: SegformerOffsetConfig):
        check_num_labels(config.num_labels, "SegFormer + offset learning")  # also for a config changed after it was built
        super().__init__(config)
        self.segformer = SegformerModel(config)
        if config.encoder_layer_norm_eps is not None:
            for module in self.segformer.modules():
                if isinstance(module, nn.LayerNorm):
                    module.eps = config.encoder_layer_norm_eps
        self.decode_head = SegformerOffsetDecodeHead(config)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        """transformers' SegFormer init, plus: offset learning W and projections truncated normal
        (std ``offset_learning_init_std``); reference-style 1×1 convs Kaiming normal (fan_out, ReLU)."""
        if isinstance(module, OffsetLearning):
            std = self.config.offset_learning_init_std
            init.trunc_normal_(module.class_embeddings, std=std)
            init.trunc_normal_(module.class_offset_proj.weight, std=std)
            init.trunc_normal_(module.feature_offset_proj.weight, std=std)
        elif isinstance(module, SegformerOffsetProjectionConv):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        else:
            super()._init_weights(module)

    @can_return_tuple
    @filter_output_hidden_states
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SemanticSegmenterOutput:
        r"""
        pixel_values (`torch.Tensor` of shape `(B, 3, H, W)`): normalised images.
        labels (`torch.LongTensor` of shape `(B, H_l, W_l)`, *optional*): class indices; pixels equal to
            `config.semantic_loss_ignore_index` are ignored. The logits are upsampled to the label size for the loss.

        Returns `SemanticSegmenterOutput` with `logits (B, K, H/8, W/8)` (+ `loss`, and the encoder stage outputs as
        `hidden_states` when `output_hidden_states=True`).
        """
        outputs = self.segformer(pixel_values, **kwargs)
        logits = self.decode_head(outputs.hidden_states)
        loss = None
        if labels is not None:
            loss = semantic_segmentation_loss(logits, labels, self.config.semantic_loss_ignore_index)
        return SemanticSegmenterOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


# save_pretrained writes an ``auto_map`` and copies this file (and its relative imports), so a saved folder also
# loads with trust_remote_code=True without offseg_hf. The Auto* registrations live in the package.
SegformerOffsetConfig.register_for_auto_class()
SegformerOffsetForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")

__all__ = [
    "DECODE_HEAD_STYLES",
    "SegformerOffsetConfig",
    "SegformerOffsetConvNormAct",
    "SegformerOffsetDecodeHead",
    "SegformerOffsetForSemanticSegmentation",
    "SegformerOffsetLinearProjection",
    "SegformerOffsetProjectionConv",
]
