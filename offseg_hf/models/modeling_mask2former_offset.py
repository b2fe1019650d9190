"""Mask2Former with offset learning before every mask prediction (paper Sec. 4, "Mask2Former w/ Offset Learning").

Mask2Former predicts the masks of its queries as ``M = W·Eᵀ`` with W the mask embeddings `(B, Q, C)` (an MLP of
each decoder layer's query states) and E the pixel embeddings `(B, C, H/4, W/4)` of its pixel decoder. As the
reference ``Offset_Learning_Mask`` does, offset learning aligns both before that product — the coupled
attention, class offset and feature offset of Eq. 4–12 with W = mask embeddings — and the masks become
``M = E'·W'ᵀ`` (no LayerNorm: Mask2Former's masks are per-query sigmoid logits, not scores across classes).

One :class:`~offseg_hf.models.offset_learning.OffsetLearning` (without learned class embeddings) (2·C² parameters, 131,072 for C = 256) is shared by all decoder layers,
like the mask MLP it follows; the aligned masks also drive the masked attention of the next layer.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import initialization as init
from transformers.models.mask2former.configuration_mask2former import Mask2FormerConfig
from transformers.models.swin.configuration_swin import SwinConfig
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerForUniversalSegmentation,
    Mask2FormerMaskPredictor,
)

from .offset_learning import OffsetLearning, check_num_labels

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

    def validate_architecture(self):
        """Mask2Former's checks, and at least 2 classes (the semantic map is an arg-max over them)."""
        super().validate_architecture()
        check_num_labels(self.num_labels, "Mask2Former + offset learning")

    @classmethod
    def from_mask2former_config(cls, config: Mask2FormerConfig, **kwargs) -> "Mask2FormerOffsetConfig":
        """The offset-learning twin of a plain [`Mask2FormerConfig`] (all fields kept; ``kwargs`` override)."""
        fields = {key: value for key, value in config.to_dict().items() if key not in _NON_ARCHITECTURE_KEYS}
        fields.update(kwargs)
        return cls(**fields)


# The Swin sizes of mmsegmentation's Mask2Former configs: (embed_dim, depths, num_heads, window_size).
SWIN_SIZES: dict[str, tuple[int, tuple[int, ...], tuple[int, ...], int]] = {
    "swin-t": (96, (2, 2, 6, 2), (3, 6, 12, 24), 7),
    "swin-s": (96, (2, 2, 18, 2), (3, 6, 12, 24), 7),
    "swin-b": (128, (2, 2, 18, 2), (4, 8, 16, 32), 12),
    "swin-l": (192, (2, 2, 18, 2), (6, 12, 24, 48), 12),
}


def mask2former_swin_config(
    swin: str | dict = "swin-t", *, num_labels: int = 150, offset_learning: bool = True, **fields
) -> Mask2FormerConfig:
    """The configuration of the reference Mask2Former (+ offset learning) on a Swin backbone.

    The head is that of mmsegmentation's ``mask2former_swin-t_8xb2-160k_ade20k-512x512`` (and the OffSeg authors'
    offset-learning twin): 256 channels everywhere, 100 queries, 6 deformable encoder layers (FFN 1024), 9 decoder
    layers (``decoder_layers=10``: transformers counts the initial prediction), FFN 2048, 8 heads; the backbone is
    Swin with LayerNorm ε 1e-5, q/k/v bias, MLP ratio 4, stochastic depth 0.3 and all four stages out.

    Args:
        swin: a name of :data:`SWIN_SIZES` (``"swin-t"``, …) or the Swin fields themselves
            (``{"embed_dim": 32, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8], …}``, any `SwinConfig` field).
        num_labels: K, the classes without the no-object class.
        offset_learning: a [`Mask2FormerOffsetConfig`] when `True`, transformers' plain [`Mask2FormerConfig`] when
            `False`.
        fields: any other field of the head (``hidden_dim``, ``num_queries``, ``id2label``, …).
    """
    if isinstance(swin, str):
        if swin not in SWIN_SIZES:
            raise ValueError(f"unknown Swin size {swin!r}; choose one of {', '.join(SWIN_SIZES)} or pass the Swin fields")
        embed_dim, depths, num_heads, window_size = SWIN_SIZES[swin]
        swin = {"embed_dim": embed_dim, "depths": list(depths), "num_heads": list(num_heads), "window_size": window_size}
    backbone = {
        "mlp_ratio": 4.0, "qkv_bias": True, "drop_path_rate": 0.3, "layer_norm_eps": 1e-5,
        "out_features": ["stage1", "stage2", "stage3", "stage4"], **swin,
    }
    config_class = Mask2FormerOffsetConfig if offset_learning else Mask2FormerConfig
    return config_class(backbone_config=SwinConfig(**backbone), num_labels=num_labels, **fields)


class Mask2FormerOffsetMaskPredictor(Mask2FormerMaskPredictor):
    """Mask2Former's mask predictor with offset learning between the mask MLP and the mask product.

    `(Q, B, D)` query states, `(B, C, H, W)` pixel embeddings → masks `(B, Q, H, W)` and the binary attention
    mask `(B·heads, Q, h·w)` at ``attention_mask_target_size`` for the next decoder layer.
    """

    def __init__(self, hidden_size: int, num_heads: int, mask_feature_size: int):
        super().__init__(hidden_size, num_heads, mask_feature_size)
        self.offset_learning = OffsetLearning(mask_feature_size)

    def forward(
        self, outputs: torch.Tensor, pixel_embeddings: torch.Tensor, attention_mask_target_size: int | None = None
    ):
        mask_embeddings = self.mask_embedder(outputs.transpose(0, 1))
        masks = self.offset_learning.masks(pixel_embeddings, mask_embeddings)
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
        check_num_labels(config.num_labels, "Mask2Former + offset learning")  # also for a config changed after it was built
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
            if isinstance(module, OffsetLearning):
                init.trunc_normal_(module.class_offset_proj.weight, std=std)
                init.trunc_normal_(module.feature_offset_proj.weight, std=std)


Mask2FormerOffsetConfig.register_for_auto_class()
Mask2FormerOffsetForUniversalSegmentation.register_for_auto_class("AutoModelForUniversalSegmentation")

__all__ = [
    "SWIN_SIZES",
    "mask2former_swin_config",
    "Mask2FormerOffsetConfig",
    "Mask2FormerOffsetForUniversalSegmentation",
    "Mask2FormerOffsetMaskPredictor",
]
