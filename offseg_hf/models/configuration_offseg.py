"""Configurations of OffSeg and of its EfficientFormerV2 backbone.

``OffSegConfig.from_preset("offseg-t", num_labels=150)`` builds the paper's models:

| preset   | backbone                | decoder stage channels (reference ``new_channels``) |
|----------|-------------------------|------------------------------------------------------|
| offseg-t | EfficientFormerV2-S1    | 32, 32, 64, 128                                      |
| offseg-b | EfficientFormerV2-S2    | 32, 64, 128, 256                                     |
| offseg-l | EfficientFormerV2-L     | 32, 64, 128, 256                                     |
"""

from __future__ import annotations

import copy

from huggingface_hub.dataclasses import strict
from transformers.backbone_utils import BackboneConfigMixin
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

from .offset_learning import check_num_labels

# EfficientFormerV2 variants (Li et al., "Rethinking Vision Transformers for MobileNet Size and Speed").
# mlp_expansion_ratios[stage][block]: hidden width of each block's MLP = ratio * stage width.
EFFICIENTFORMER_V2_VARIANTS: dict[str, dict] = {
    "s0": {
        "hidden_sizes": [32, 48, 96, 176],
        "depths": [2, 2, 6, 4],
        "num_attention_blocks": [0, 0, 2, 2],
        "mlp_expansion_ratios": [[4, 4], [4, 4], [4, 3, 3, 3, 4, 4], [4, 3, 3, 4]],
    },
    "s1": {
        "hidden_sizes": [32, 48, 120, 224],
        "depths": [3, 3, 9, 6],
        "num_attention_blocks": [0, 0, 2, 2],
        "mlp_expansion_ratios": [[4, 4, 4], [4, 4, 4], [4, 4, 3, 3, 3, 3, 4, 4, 4], [4, 4, 3, 3, 4, 4]],
    },
    "s2": {
        "hidden_sizes": [32, 64, 144, 288],
        "depths": [4, 4, 12, 8],
        "num_attention_blocks": [0, 0, 4, 4],
        "mlp_expansion_ratios": [
            [4, 4, 4, 4],
            [4, 4, 4, 4],
            [4, 4, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4],
            [4, 4, 3, 3, 3, 3, 4, 4],
        ],
    },
    "l": {
        "hidden_sizes": [40, 80, 192, 384],
        "depths": [5, 5, 15, 10],
        "num_attention_blocks": [0, 0, 6, 6],
        "mlp_expansion_ratios": [
            [4, 4, 4, 4, 4],
            [4, 4, 4, 4, 4],
            [4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4],
            [4, 4, 4, 3, 3, 3, 3, 4, 4, 4],
        ],
    },
}

OFFSEG_PRESETS: dict[str, dict] = {
    "offseg-t": {"backbone_variant": "s1", "decoder_stage_channels": [32, 32, 64, 128]},
    "offseg-b": {"backbone_variant": "s2", "decoder_stage_channels": [32, 64, 128, 256]},
    "offseg-l": {"backbone_variant": "l", "decoder_stage_channels": [32, 64, 128, 256]},
}


@strict
class EfficientFormerV2Config(BackboneConfigMixin, PreTrainedConfig):
    r"""
    Configuration of [`EfficientFormerV2Backbone`], the segmentation form of EfficientFormerV2.

    Args:
        num_channels (`int`, defaults to 3): input channels.
        hidden_sizes (`list[int]`): width of the four stages (strides 4, 8, 16, 32).
        depths (`list[int]`): number of blocks per stage.
        num_attention_blocks (`list[int]`): how many of the *last* blocks of each stage carry multi-head
            self-attention (the others are MLP-only). Attention in stage 3 (index 2) runs on a stride-2
            subsampled grid; the stage-3 → stage-4 downsampling always adds an attention branch.
        mlp_expansion_ratios (`list[list[int]]`): MLP expansion ratio of every block.
        key_dim (`int`, defaults to 32), num_attention_heads (`int`, defaults to 8), attention_ratio (`int`,
            defaults to 4): attention block sizes (value dim = attention_ratio * key_dim per head).
        downsample_key_dim (`int`, defaults to 16), downsample_num_attention_heads (`int`, defaults to 8):
            sizes of the attention in the stage-3 → stage-4 downsampling.
        attention_bias_resolution (`int`, defaults to 512): input size for which the relative-position
            attention biases are laid out; at other sizes the bias table is resized bicubically.
        hidden_act (`str`, defaults to `"gelu"`): activation everywhere in the backbone.
        drop_path_rate (`float`, defaults to 0.0): stochastic depth, linearly increasing over blocks.
        layer_scale_init_value (`float`, defaults to 1e-5): initial value of the per-channel layer scales.
        batch_norm_eps (`float`, defaults to 1e-5).
        initializer_range (`float`, defaults to 0.02): std of the truncated-normal init of MLP convolutions.
        out_features / out_indices: which stages (`"stem"`, `"stage1"` … `"stage4"`) the backbone returns;
            like every Transformers backbone, the last stage only when neither is given.
    """

    model_type = "offseg_efficientformer_v2"

    num_channels: int = 3
    hidden_sizes: list[int] | tuple[int, ...] = (32, 48, 120, 224)
    depths: list[int] | tuple[int, ...] = (3, 3, 9, 6)
    num_attention_blocks: list[int] | tuple[int, ...] = (0, 0, 2, 2)
    mlp_expansion_ratios: list | tuple | None = None
    key_dim: int = 32
    num_attention_heads: int = 8
    attention_ratio: int = 4
    downsample_key_dim: int = 16
    downsample_num_attention_heads: int = 8
    attention_bias_resolution: int = 512
    hidden_act: str = "gelu"
    drop_path_rate: float | int = 0.0
    layer_scale_init_value: float = 1e-5
    batch_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self.hidden_sizes = list(self.hidden_sizes)
        self.depths = list(self.depths)
        self.num_attention_blocks = list(self.num_attention_blocks)
        if self.mlp_expansion_ratios is None:
            self.mlp_expansion_ratios = [[4] * depth for depth in self.depths]
        self.mlp_expansion_ratios = [list(ratios) for ratios in self.mlp_expansion_ratios]
        self.stage_names = ["stem"] + [f"stage{idx}" for idx in range(1, len(self.depths) + 1)]
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Check that the per-stage lists agree with each other."""
        if not (len(self.hidden_sizes) == len(self.depths) == len(self.num_attention_blocks) == 4):
            raise ValueError(
                "EfficientFormerV2 has 4 stages: hidden_sizes, depths and num_attention_blocks need 4 entries each, "
                f"got {self.hidden_sizes}, {self.depths}, {self.num_attention_blocks}"
            )
        for stage, (depth, ratios) in enumerate(zip(self.depths, self.mlp_expansion_ratios)):
            if len(ratios) != depth:
                raise ValueError(
                    f"mlp_expansion_ratios[{stage}] has {len(ratios)} entries but stage {stage} has {depth} blocks"
                )
        if self.num_attention_blocks[0] or self.num_attention_blocks[1]:
            raise ValueError("attention blocks are only supported in stages 3 and 4 (num_attention_blocks[0:2] == 0)")
        for stage, (depth, count) in enumerate(zip(self.depths, self.num_attention_blocks)):
            if count > depth:
                raise ValueError(f"stage {stage} has {depth} blocks, fewer than num_attention_blocks={count}")

    @classmethod
    def from_variant(cls, variant: str, **kwargs) -> "EfficientFormerV2Config":
        """Config of a named variant: ``"s0"``, ``"s1"``, ``"s2"`` or ``"l"``."""
        key = variant.lower().removeprefix("efficientformerv2_").removeprefix("efficientformerv2-")
        if key not in EFFICIENTFORMER_V2_VARIANTS:
            raise ValueError(
                f"unknown EfficientFormerV2 variant {variant!r}; choose one of {sorted(EFFICIENTFORMER_V2_VARIANTS)}"
            )
        return cls(**copy.deepcopy(EFFICIENTFORMER_V2_VARIANTS[key]), **kwargs)


CLASSIFIERS = ("offset_learning", "per_pixel")


@strict
class OffSegConfig(PreTrainedConfig):
    r"""
    Configuration of [`OffSegForSemanticSegmentation`].

    Args:
        backbone_config (`EfficientFormerV2Config`, `dict` or any Transformers backbone config): the backbone; it must
            return four feature maps of strides 4, 8, 16 and 32. Defaults to EfficientFormerV2-S1 with all four stages.
        decoder_stage_channels (`list[int]`): output channels of the per-stage 1×1 conv + GroupNorm + ReLU
            (``new_channels`` in the reference configs), from stride 4 to stride 32.
        decoder_hidden_size (`int`, defaults to 256): channels of the aligned feature E fed to the classifier.
        decoder_num_groups (`int`, defaults to 32): GroupNorm groups of the decoder's conv blocks.
        freqfusion_lowpass_kernel (`int`, defaults to 5), freqfusion_highpass_kernel (`int`, defaults to 3):
            CARAFE kernel sizes of FreqFusion's adaptive low-pass and high-pass filters.
        freqfusion_encoder_kernel (`int`, defaults to 3): kernel of the filter generators (content encoders).
        freqfusion_sampler_kernel (`int`, defaults to 3): kernel of the similarity-guided resampler's offset and
            scale convolutions.
        freqfusion_resample_groups (`int`, defaults to 4): channel groups of the similarity-guided resampler; the
            decoder's interleaved concatenation uses as many channel blocks, so that groups and blocks stay aligned.
        classifier (`str`, defaults to `"offset_learning"`): `"offset_learning"` (the paper, Eq. 4–13) or
            `"per_pixel"` (a 1×1 convolution, the baseline of the paper's Table 6).
        classifier_dropout_prob (`float`, defaults to 0.0): dropout on the aligned feature before the classifier,
            training only. The reference head declares ``dropout_ratio=0.1`` but never applies it, so 0.0 reproduces
            the published models.
        offset_learning_init_std (`float`, defaults to 0.02): std of the truncated-normal init of the class
            embeddings W and of both offset projections.
        semantic_loss_ignore_index (`int`, defaults to 255): label value ignored by the loss (and by the data and
            metrics of this package).
        num_labels / id2label / label2id: the classes (standard Transformers fields); at least 2 (binary
            segmentation is foreground/background with 2 classes).
    """

    model_type = "offseg"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=EfficientFormerV2Config)}

    backbone_config: dict | PreTrainedConfig | None = None
    decoder_stage_channels: list[int] | tuple[int, ...] = (32, 32, 64, 128)
    decoder_hidden_size: int = 256
    decoder_num_groups: int = 32
    freqfusion_lowpass_kernel: int = 5
    freqfusion_highpass_kernel: int = 3
    freqfusion_encoder_kernel: int = 3
    freqfusion_sampler_kernel: int = 3
    freqfusion_resample_groups: int = 4
    classifier: str = "offset_learning"
    classifier_dropout_prob: float | int = 0.0
    offset_learning_init_std: float = 0.02
    semantic_loss_ignore_index: int = 255

    def __post_init__(self, **kwargs):
        self.decoder_stage_channels = list(self.decoder_stage_channels)
        # The default backbone is resolved here rather than through AutoConfig, so that a saved folder also loads
        # as remote code (where nothing registers EfficientFormerV2Config); any other backbone config dict is
        # resolved by its model_type in super().__post_init__ (sub_configs_defaults), as in UperNet.
        backbone = self.backbone_config
        if backbone is None:
            self.backbone_config = EfficientFormerV2Config(out_features=["stage1", "stage2", "stage3", "stage4"])
        elif isinstance(backbone, dict) and backbone.get("model_type", EfficientFormerV2Config.model_type) == (
            EfficientFormerV2Config.model_type
        ):
            self.backbone_config = EfficientFormerV2Config(**{k: v for k, v in backbone.items() if k != "model_type"})
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Check the classes, the decoder widths against the backbone and the group counts they must divide."""
        check_num_labels(self.num_labels, "OffSeg")
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {self.classifier!r}")
        stages = self.decoder_stage_channels
        if len(stages) != 4:
            raise ValueError(f"decoder_stage_channels needs 4 entries (strides 4…32), got {stages}")
        out_features = getattr(self.backbone_config, "out_features", None)
        if out_features is not None and len(out_features) != len(stages):
            raise ValueError(
                f"the backbone returns {len(out_features)} feature maps ({out_features}) but decoder_stage_channels "
                f"has {len(stages)} entries; the decoder needs the four maps of strides 4, 8, 16 and 32"
            )
        for width in stages + [self.decoder_hidden_size]:
            if width % self.decoder_num_groups:
                raise ValueError(
                    f"decoder width {width} is not divisible by decoder_num_groups={self.decoder_num_groups}"
                )
        groups = self.freqfusion_resample_groups
        for width in stages:
            if width % groups:
                raise ValueError(
                    f"decoder stage width {width} is not divisible by freqfusion_resample_groups={groups} "
                    "(the resampler groups and the interleaved concatenation split channels into that many blocks)"
                )
        high_resolution, low_resolution = stages[-2::-1], stages[-1]
        for hr_channels in high_resolution:
            compressed = (hr_channels + low_resolution) // 4
            if compressed < 8 or compressed % (compressed // 8):
                raise ValueError(
                    f"FreqFusion of {hr_channels} + {low_resolution} channels compresses to {compressed}, which its "
                    f"resampler's GroupNorm({compressed} // 8, {compressed}) cannot normalise; widen decoder_stage_channels"
                )
            low_resolution += hr_channels
        for name in ("freqfusion_lowpass_kernel", "freqfusion_highpass_kernel", "freqfusion_encoder_kernel", "freqfusion_sampler_kernel"):
            if getattr(self, name) % 2 == 0:
                raise ValueError(f"{name} must be odd, got {getattr(self, name)}")

    @classmethod
    def from_preset(cls, preset: str, **kwargs) -> "OffSegConfig":
        """The paper's models: ``"offseg-t"``, ``"offseg-b"`` or ``"offseg-l"`` (plus any field override).

        Example: ``OffSegConfig.from_preset("offseg-t", num_labels=150)``.
        """
        key = preset.lower()
        if key not in OFFSEG_PRESETS:
            raise ValueError(f"unknown OffSeg preset {preset!r}; choose one of {sorted(OFFSEG_PRESETS)}")
        spec = OFFSEG_PRESETS[key]
        backbone_kwargs = {"out_features": ["stage1", "stage2", "stage3", "stage4"], **kwargs.pop("backbone_kwargs", {})}
        kwargs.setdefault("decoder_stage_channels", list(spec["decoder_stage_channels"]))
        backbone = EfficientFormerV2Config.from_variant(spec["backbone_variant"], **backbone_kwargs)
        return cls(backbone_config=backbone, **kwargs)


EfficientFormerV2Config.register_for_auto_class()
OffSegConfig.register_for_auto_class()

__all__ = ["CLASSIFIERS", "EfficientFormerV2Config", "OffSegConfig", "EFFICIENTFORMER_V2_VARIANTS", "OFFSEG_PRESETS"]
