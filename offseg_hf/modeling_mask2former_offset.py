"""Mask2Former with offset learning before every mask prediction (paper Sec. 4, "Mask2Former w/ Offset Learning").

Mask2Former predicts the masks of its queries as ``M = W·Eᵀ`` with W the mask embeddings `(B, Q, C)` (an MLP of
each decoder layer's query states) and E the pixel embeddings `(B, C, H/4, W/4)` of its pixel decoder. As the
reference ``Offset_Learning_Mask`` does, offset learning aligns both before that product — the coupled
attention, class offset and feature offset of Eq. 4–12 with W = mask embeddings — and the masks become
``M = E'·W'ᵀ`` (no LayerNorm: Mask2Former's masks are per-query sigmoid logits, not scores across classes).

One :class:`OffSegMaskOffsetLearning` (2·C² parameters, 131,072 for C = 256) is shared by all decoder layers,
like the mask MLP it follows; the aligned masks also drive the masked attention of the next layer.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import initialization as init
from transformers.models.auto.configuration_auto import AutoConfig
from transformers.models.auto.modeling_auto import AutoModelForUniversalSegmentation
from transformers.models.mask2former.configuration_mask2former import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerForUniversalSegmentation,
    Mask2FormerMaskPredictor,
)

_NON_ARCHITECTURE_KEYS = ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path")


@strict
class Mask2FormerOffsetConfig(Mask2FormerConfig):
    r"""
    Configuration of [`Mask2FormerOffsetForUniversalSegmentation`]: every [`Mask2FormerConfig`] field plus

    Args:
        offset_learning_init_std (`float`, defaults to 0.02): std of the truncated-normal init of both offset
            projections.
    """

    model_type = "mask2former_offset"

    offset_learning_init_std: float = 0.02

    def __post_init__(self, **kwargs):
        # A plain Mask2Former config.json may be loaded into this class: keep our own model_type.
        kwargs.pop("model_type", None)
        super().__post_init__(**kwargs)

    @classmethod
    def from_mask2former_config(cls, config: Mask2FormerConfig, **kwargs) -> "Mask2FormerOffsetConfig":
        """The offset-learning twin of a plain [`Mask2FormerConfig`] (all fields kept; ``kwargs`` override)."""
        fields = {key: value for key, value in config.to_dict().items() if key not in _NON_ARCHITECTURE_KEYS}
        fields.update(kwargs)
        return cls(**fields)


class OffSegMaskOffsetLearning(nn.Module):
    """Offset learning between given class (query/mask) embeddings and pixel embeddings (Eq. 4–12).

    With pixel embeddings E `(B, HW, C)` and class embeddings W `(B, Q, C)`:

    * coupled attention ``A = W·Eᵀ``                                          (Eq. 4)
    * ``W' = W + class_offset_proj(softmax_HW(A)·E)``                         (Eq. 5–8)
    * ``E' = E + feature_offset_proj(softmax_Q(A)ᵀ·W)`` (uses the original W)  (Eq. 9–12)

    :class:`~offseg_hf.modeling_offseg.OffSegOffsetLearning` is this with W a learned parameter shared by all
    images, followed by ``LayerNorm_K(E'·W'ᵀ)``.

    Args:
        hidden_size: C.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.class_offset_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.feature_offset_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(
        self, class_embeddings: torch.Tensor, pixel_embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, Q, C)`, `(B, C, H, W)` → aligned `(B, Q, C)`, aligned `(B, C, H, W)`."""
        batch, channels, height, width = pixel_embeddings.shape
        if class_embeddings.ndim != 3 or class_embeddings.shape[0] != batch or class_embeddings.shape[2] != channels:
            raise ValueError(
                f"class embeddings {tuple(class_embeddings.shape)} do not fit pixel embeddings "
                f"{tuple(pixel_embeddings.shape)}: expected (batch={batch}, queries, channels={channels})"
            )
        pixels = pixel_embeddings.flatten(2).transpose(1, 2)  # E: (B, HW, C)
        attention = pixels @ class_embeddings.transpose(1, 2)  # Aᵀ: (B, HW, Q)
        class_offset = self.class_offset_proj(attention.softmax(dim=1).transpose(1, 2) @ pixels)  # (B, Q, C)
        feature_offset = self.feature_offset_proj(attention.softmax(dim=2) @ class_embeddings)  # (B, HW, C)
        aligned_pixels = (pixels + feature_offset).transpose(1, 2).reshape(batch, channels, height, width)
        return class_embeddings + class_offset, aligned_pixels

    def masks(self, class_embeddings: torch.Tensor, pixel_embeddings: torch.Tensor) -> torch.Tensor:
        """Mask logits ``E'·W'ᵀ`` as `(B, Q, H, W)`, without building E' `(B, HW, C)`.

        Re-associated like :meth:`OffSegOffsetLearning.forward`:
        ``E'·W'ᵀ = E·W'ᵀ + softmax_Q(A)·(W·P_fᵀ·W'ᵀ)`` (``P_f``: weight of ``feature_offset_proj``), which
        costs HW·Q² instead of HW·C² multiply-adds per image — per decoder layer, at 1/4 resolution.
        Equal to ``einsum("bqc,bchw->bqhw", *self(class_embeddings, pixel_embeddings))`` up to rounding.
        """
        batch, channels, height, width = pixel_embeddings.shape
        pixels = pixel_embeddings.flatten(2).transpose(1, 2)  # E: (B, HW, C)
        attention = pixels @ class_embeddings.transpose(1, 2)  # Aᵀ: (B, HW, Q)
        aligned = class_embeddings + self.class_offset_proj(attention.softmax(dim=1).transpose(1, 2) @ pixels)
        mixed = self.feature_offset_proj(class_embeddings) @ aligned.transpose(1, 2)  # W·P_fᵀ·W'ᵀ: (B, Q, Q)
        masks = pixels @ aligned.transpose(1, 2) + attention.softmax(dim=2) @ mixed  # (B, HW, Q)
        return masks.transpose(1, 2).reshape(batch, -1, height, width)


class Mask2FormerOffsetMaskPredictor(Mask2FormerMaskPredictor):
    """Mask2Former's mask predictor with offset learning between the mask MLP and the mask product.

    `(Q, B, D)` query states, `(B, C, H, W)` pixel embeddings → masks `(B, Q, H, W)` and the binary attention
    mask `(B·heads, Q, h·w)` at ``attention_mask_target_size`` for the next decoder layer.
    """

    def __init__(self, hidden_size: int, num_heads: int, mask_feature_size: int):
        super().__init__(hidden_size, num_heads, mask_feature_size)
        self.offset_learning = OffSegMaskOffsetLearning(mask_feature_size)

    def forward(
        self, outputs: torch.Tensor, pixel_embeddings: torch.Tensor, attention_mask_target_size: int | None = None
    ):
        mask_embeddings = self.mask_embedder(outputs.transpose(0, 1))
        masks = self.offset_learning.masks(mask_embeddings, pixel_embeddings)
        attention_mask = nn.functional.interpolate(
            masks, size=attention_mask_target_size, mode="bilinear", align_corners=False
        )
        attention_mask = attention_mask.sigmoid().flatten(2).unsqueeze(1).repeat(1, self.num_heads, 1, 1)
        attention_mask = (attention_mask.flatten(0, 1) < 0.5).bool().detach()
        return masks, attention_mask


class Mask2FormerOffsetForUniversalSegmentation(Mask2FormerForUniversalSegmentation):
    """Mask2Former whose decoder predicts masks through offset learning (inputs, outputs and losses unchanged).

    Parameter names match transformers' `Mask2FormerForUniversalSegmentation` plus
    ``model.transformer_module.decoder.mask_predictor.offset_learning.*``, so a plain Mask2Former checkpoint
    loads with only those newly initialised.
    """

    config_class = Mask2FormerOffsetConfig
    config: Mask2FormerOffsetConfig

    def __init__(self, config: Mask2FormerOffsetConfig):
        super().__init__(config)
        decoder = self.model.transformer_module.decoder
        predictor = Mask2FormerOffsetMaskPredictor(config.hidden_dim, config.num_attention_heads, config.mask_feature_size)
        predictor.mask_embedder = decoder.mask_predictor.mask_embedder  # already initialised by the parent
        decoder.mask_predictor = predictor
        self.post_init()  # initialises only the modules not initialised yet: the offset learning

    @torch.no_grad()
    def initialize_weights(self):
        """Mask2Former's init, then truncated-normal offset projections (std ``offset_learning_init_std``).

        The offset learning sits inside `Mask2FormerModel`, a sub-model that initialises its own subtree with its
        generic Linear init, so ours runs afterwards; weights loaded from a checkpoint are left untouched.
        """
        super().initialize_weights()
        std = self.config.offset_learning_init_std
        for module in self.modules():
            if isinstance(module, OffSegMaskOffsetLearning):
                init.trunc_normal_(module.class_offset_proj.weight, std=std)
                init.trunc_normal_(module.feature_offset_proj.weight, std=std)


AutoConfig.register(Mask2FormerOffsetConfig.model_type, Mask2FormerOffsetConfig, exist_ok=True)
AutoModelForUniversalSegmentation.register(
    Mask2FormerOffsetConfig, Mask2FormerOffsetForUniversalSegmentation, exist_ok=True
)
Mask2FormerOffsetConfig.register_for_auto_class()
Mask2FormerOffsetForUniversalSegmentation.register_for_auto_class("AutoModelForUniversalSegmentation")

__all__ = [
    "Mask2FormerOffsetConfig",
    "Mask2FormerOffsetForUniversalSegmentation",
    "Mask2FormerOffsetMaskPredictor",
    "OffSegMaskOffsetLearning",
]
