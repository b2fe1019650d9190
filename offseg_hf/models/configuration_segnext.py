"""Configurations of SegNeXt (Guo et al., NeurIPS 2022) and of its MSCAN backbone, with or without offset learning.

``SegNextConfig.from_preset("segnext-t-offset", num_labels=150)`` builds the OffSeg paper's Table 3 models
(``"segnext-t"`` the plain SegNeXt with its per-pixel 1×1 classifier):

| preset    | MSCAN widths        | blocks per stage | drop path | Hamburger / decoder channels |
|-----------|---------------------|------------------|-----------|------------------------------|
| segnext-t | 32, 64, 160, 256    | 3, 3, 5, 2       | 0.1       | 256                          |
| segnext-s | 64, 128, 320, 512   | 2, 2, 4, 2       | 0.1       | 256                          |
| segnext-b | 64, 128, 320, 512   | 3, 3, 12, 3      | 0.1       | 512                          |
| segnext-l | 64, 128, 320, 512   | 3, 5, 27, 3      | 0.3       | 1024                         |

Every size uses MLP ratios 8, 8, 4, 4, a 5×5 depthwise convolution and strip convolutions of 7, 11 and 21
in the multi-scale convolutional attention, and the decode head reads stages 2–4. The reference repository
publishes offset-learning configs for T/S/B only; ``-offset`` on any preset selects offset learning.
"""

from __future__ import annotations

import copy

from huggingface_hub.dataclasses import strict
from transformers.backbone_utils import BackboneConfigMixin
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

from .offset_learning import check_num_labels

CLASSIFIERS = ("offset_learning", "per_pixel")

MSCAN_VARIANTS: dict[str, dict] = {
    "t": {"hidden_sizes": [32, 64, 160, 256], "depths": [3, 3, 5, 2], "drop_path_rate": 0.1},
    "s": {"hidden_sizes": [64, 128, 320, 512], "depths": [2, 2, 4, 2], "drop_path_rate": 0.1},
    "b": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 3, 12, 3], "drop_path_rate": 0.1},
    "l": {"hidden_sizes": [64, 128, 320, 512], "depths": [3, 5, 27, 3], "drop_path_rate": 0.3},
}

SEGNEXT_PRESETS: dict[str, dict] = {
    "segnext-t": {"backbone_variant": "t", "hamburger_channels": 256, "decoder_hidden_size": 256},
    "segnext-s": {"backbone_variant": "s", "hamburger_channels": 256, "decoder_hidden_size": 256},
    "segnext-b": {"backbone_variant": "b", "hamburger_channels": 512, "decoder_hidden_size": 512},
    "segnext-l": {"backbone_variant": "l", "hamburger_channels": 1024, "decoder_hidden_size": 1024},
}

# The stages the SegNeXt decode head reads (reference ``in_index=[1, 2, 3]``: strides 8, 16 and 32).
SEGNEXT_BACKBONE_FEATURES = ["stage2", "stage3", "stage4"]


@strict
class MscanConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    Configuration of [`MscanBackbone`], the multi-scale convolutional attention network of SegNeXt.

    Args:
        num_channels (`int`, defaults to 3): input channels of the stem.
        hidden_sizes (`list[int]`): width of the four stages (strides 4, 8, 16, 32).
        depths (`list[int]`): MSCA blocks per stage.
        mlp_ratios (`list[int]`): hidden width of each stage's MLP as a multiple of the stage width.
        attention_kernel_size (`int`, defaults to 5): the depthwise convolution that aggregates local context in
            the multi-scale convolutional attention (MSCA).
        strip_kernel_sizes (`list[int]`, defaults to `[7, 11, 21]`): lengths of the MSCA branches of depthwise
            strip convolutions (a 1×k followed by a k×1 convolution each).
        hidden_act (`str`, defaults to `"gelu"`): activation of the stem, the attention and the MLP.
        drop_path_rate (`float`, defaults to 0.1): stochastic depth, increasing linearly over all blocks.
        layer_scale_init_value (`float`, defaults to 1e-2): initial value of the per-channel layer scales.
        batch_norm_eps (`float`, defaults to 1e-5), layer_norm_eps (`float`, defaults to 1e-5): norm epsilons.
        initializer_range (`float`, defaults to 0.02): kept for Transformers utilities; convolutions use the
            reference's fan-out normal init.
        out_features / out_indices: which of ``"stem"``, ``"stage1"`` … ``"stage4"`` the backbone returns
            (default: the last stage, as every Transformers backbone).
    """

    model_type = "mscan"

    num_channels: int = 3
    hidden_sizes: list[int] | tuple[int, ...] = (32, 64, 160, 256)
    depths: list[int] | tuple[int, ...] = (3, 3, 5, 2)
    mlp_ratios: list[int] | tuple[int, ...] = (8, 8, 4, 4)
    attention_kernel_size: int = 5
    strip_kernel_sizes: list[int] | tuple[int, ...] = (7, 11, 21)
    hidden_act: str = "gelu"
    drop_path_rate: float | int = 0.1
    layer_scale_init_value: float = 1e-2
    batch_norm_eps: float = 1e-5
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self.hidden_sizes = list(self.hidden_sizes)
        self.depths = list(self.depths)
        self.mlp_ratios = list(self.mlp_ratios)
        self.strip_kernel_sizes = list(self.strip_kernel_sizes)
        self.stage_names = ["stem"] + [f"stage{index}" for index in range(1, len(self.depths) + 1)]
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )
        super().__post_init__(**kwargs)

    @property
    def num_hidden_layers(self) -> int:
        """Number of stages (``hidden_states`` holds the stem output and one map per stage)."""
        return len(self.depths)

    def validate_architecture(self):
        """Check that the per-stage lists agree and that every kernel is odd (same-size padding)."""
        if not (len(self.hidden_sizes) == len(self.depths) == len(self.mlp_ratios)):
            raise ValueError(
                "MSCAN: hidden_sizes, depths and mlp_ratios need one entry per stage, got "
                f"{self.hidden_sizes}, {self.depths}, {self.mlp_ratios}"
            )
        for kernel in [self.attention_kernel_size, *self.strip_kernel_sizes]:
            if kernel % 2 == 0:
                raise ValueError(f"MSCAN attention kernels must be odd, got {kernel}")

    @classmethod
    def from_variant(cls, variant: str, **kwargs) -> "MscanConfig":
        """Config of a named variant: ``"t"``, ``"s"``, ``"b"`` or ``"l"`` (also ``"mscan_t"``, ``"mscan-t"``)."""
        key = variant.lower().removeprefix("mscan_").removeprefix("mscan-")
        if key not in MSCAN_VARIANTS:
            raise ValueError(f"unknown MSCAN variant {variant!r}; choose one of {sorted(MSCAN_VARIANTS)}")
        return cls(**{**copy.deepcopy(MSCAN_VARIANTS[key]), **kwargs})


@strict
class SegNextConfig(PreTrainedConfig):
    r"""
    Configuration of [`SegNextForSemanticSegmentation`]: MSCAN, the light Hamburger decode head and a classifier.

    Args:
        backbone_config (`MscanConfig` or `dict`): the backbone; defaults to MSCAN-T returning stages 2–4.
        classifier (`str`, defaults to `"per_pixel"`): `"per_pixel"`, the plain SegNeXt 1×1 convolution, or
            `"offset_learning"`, the OffSeg paper's replacement of it (Table 3).
        hamburger_channels (`int`, defaults to 256): width of the squeezed feature and of the Hamburger.
        decoder_hidden_size (`int`, defaults to 256): width of the aligned feature fed to the classifier.
        decoder_num_groups (`int`, defaults to 32): GroupNorm groups of the head's conv blocks.
        nmf_rank (`int`, defaults to 16): R, the number of NMF bases.
        nmf_train_steps (`int`, defaults to 6), nmf_eval_steps (`int`, defaults to 7): multiplicative-update
            iterations in training and in evaluation.
        nmf_inv_t (`float`, defaults to 1.0): inverse temperature of the softmax that initialises the NMF
            coefficients. The reference configs say 100, but its ``NMF2D`` overwrites that with 1; 1 reproduces it.
        nmf_eval_seed (`int` or `None`, defaults to 0): in evaluation mode the NMF bases are one draw from a
            ``torch.Generator`` seeded with this value, shared by every image of the batch: identical inputs give
            identical logits in every call, batch and process. `None` draws them like the
            reference, from PyTorch's global random generator (one set per image), so predictions vary from
            call to call. Training always draws fresh bases from the global generator.
        classifier_dropout_prob (`float`, defaults to 0.1): channel dropout (``Dropout2d``) before the per-pixel
            classifier, in training (the reference LightHamHead's ``dropout_ratio``). The reference
            offset-learning head never applies its dropout, so neither does ``classifier="offset_learning"``.
        semantic_loss_ignore_index (`int`, defaults to 255): label value ignored by the loss.
        initializer_range (`float`, defaults to 0.02): std of the truncated-normal init of offset learning.
        num_labels / id2label / label2id: the classes (standard Transformers fields, at least 2 classes).
    """

    model_type = "segnext"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=MscanConfig)}

    backbone_config: dict | PreTrainedConfig | None = None
    classifier: str = "per_pixel"
    hamburger_channels: int = 256
    decoder_hidden_size: int = 256
    decoder_num_groups: int = 32
    nmf_rank: int = 16
    nmf_train_steps: int = 6
    nmf_eval_steps: int = 7
    nmf_inv_t: float | int = 1.0
    nmf_eval_seed: int | None = 0
    classifier_dropout_prob: float | int = 0.1
    semantic_loss_ignore_index: int = 255
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        # Resolved here rather than through AutoConfig, so that a saved folder also loads as remote code
        # (where "mscan" is not registered with AutoConfig).
        if self.backbone_config is None:
            self.backbone_config = MscanConfig(out_features=list(SEGNEXT_BACKBONE_FEATURES))
        elif isinstance(self.backbone_config, dict):
            self.backbone_config = MscanConfig.from_dict(
                {k: v for k, v in self.backbone_config.items() if k != "model_type"}
            )
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Check the classifier name, the class count and the GroupNorm group counts."""
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {self.classifier!r}")
        check_num_labels(self.num_labels, "SegNeXt")
        for width in (self.hamburger_channels, self.decoder_hidden_size):
            if width % self.decoder_num_groups:
                raise ValueError(f"decoder width {width} is not divisible by decoder_num_groups={self.decoder_num_groups}")

    @classmethod
    def from_preset(cls, preset: str, **kwargs) -> "SegNextConfig":
        """The paper's models: ``"segnext-t"``, ``-s``, ``-b``, ``-l``, with ``-offset`` for offset learning.

        Example: ``SegNextConfig.from_preset("segnext-t-offset", num_labels=150)``; any field can be overridden,
        ``backbone_kwargs`` go to the :class:`MscanConfig`.
        """
        key = preset.lower()
        if key.endswith("-offset"):
            key = key.removesuffix("-offset")
            kwargs.setdefault("classifier", "offset_learning")
        if key not in SEGNEXT_PRESETS:
            names = sorted(SEGNEXT_PRESETS) + sorted(f"{name}-offset" for name in SEGNEXT_PRESETS)
            raise ValueError(f"unknown SegNeXt preset {preset!r}; choose one of {names}")
        spec = SEGNEXT_PRESETS[key]
        backbone_kwargs = {"out_features": list(SEGNEXT_BACKBONE_FEATURES), **kwargs.pop("backbone_kwargs", {})}
        kwargs.setdefault("hamburger_channels", spec["hamburger_channels"])
        kwargs.setdefault("decoder_hidden_size", spec["decoder_hidden_size"])
        backbone = MscanConfig.from_variant(spec["backbone_variant"], **backbone_kwargs)
        return cls(backbone_config=backbone, **kwargs)


MscanConfig.register_for_auto_class()
SegNextConfig.register_for_auto_class()

__all__ = ["CLASSIFIERS", "MSCAN_VARIANTS", "MscanConfig", "SEGNEXT_PRESETS", "SegNextConfig"]
