"""SegNeXt (Guo et al., "SegNeXt: Rethinking Convolutional Attention Design for Semantic Segmentation",
NeurIPS 2022), with its per-pixel classifier or with OffSeg's offset learning (OffSeg paper, Table 3).

* **MSCAN** (:class:`MscanBackbone`): a convolutional stem and four stages of MSCA blocks. A block is
  ``x + s₁·Attention(BN(x))`` then ``x + s₂·MLP(BN(x))``; the attention is a 1×1 projection, GELU, the
  multi-scale convolutional attention (MSCA, paper Eq. 1) and a 1×1 projection, plus a residual:

      Att = Conv₁ₓ₁( Σ_{i=0..3} Scale_i( DW-Conv(F) ) ),   Out = Att ⊗ F                         (Eq. 1)

  with Scale₀ the identity and Scale₁₋₃ pairs of depthwise strip convolutions 1×k then k×1 (k = 7, 11, 21).
  Every stage ends with a LayerNorm over channels; the outputs have strides 4, 8, 16, 32, for any input size
  (each stride-2 convolution maps a side n to ⌈n / 2⌉).
* **Light Hamburger head** (:class:`SegNextLightHamHead`): stages 2–4 are bilinearly resized to the stride-8
  map and concatenated, squeezed by a 1×1 conv block, passed through the **Hamburger** (1×1 conv, ReLU,
  **NMF2D** matrix decomposition, 1×1 conv + GroupNorm, residual, ReLU) and aligned by a 1×1 conv block.
* **Classifier** at stride 8: a 1×1 convolution (``classifier="per_pixel"``, the original SegNeXt) or offset
  learning (``classifier="offset_learning"``, :class:`~offseg_hf.models.offset_learning.OffsetLearning`).

The NMF of the Hamburger starts from random bases. The reference draws new ones at every forward, in
evaluation too; here evaluation draws them from a generator seeded with ``config.nmf_eval_seed`` (identical
logits for identical inputs), training from PyTorch's global generator as the reference; see
:class:`SegNextNMF2D`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput, SemanticSegmenterOutput
from transformers.modeling_utils import PreTrainedModel
from transformers.models.convnext.modeling_convnext import ConvNextDropPath
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_segnext import MscanConfig, SegNextConfig
from .loss import semantic_segmentation_loss
from .offset_learning import OffsetLearning, check_num_labels
from .precision import layer_scaled

# --------------------------------------------------------------------------------------------------
# MSCAN
# --------------------------------------------------------------------------------------------------


class MscanStem(nn.Module):
    """Two stride-2 3×3 convolutions with BatchNorm, GELU between them: `(B, 3, H, W) -> (B, C₁, ⌈H/4⌉, ⌈W/4⌉)`."""

    def __init__(self, config: MscanConfig):
        super().__init__()
        width = config.hidden_sizes[0]
        self.conv1 = nn.Conv2d(config.num_channels, width // 2, 3, stride=2, padding=1)
        self.norm1 = nn.BatchNorm2d(width // 2, eps=config.batch_norm_eps)
        self.activation = ACT2FN[config.hidden_act]
        self.conv2 = nn.Conv2d(width // 2, width, 3, stride=2, padding=1)
        self.norm2 = nn.BatchNorm2d(width, eps=config.batch_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.conv2(self.activation(self.norm1(self.conv1(pixel_values)))))


class MscanDownsample(nn.Module):
    """Overlapping patch embedding between stages: 3×3 stride-2 conv + BatchNorm, `(B, C, H, W) -> (B, C', ⌈H/2⌉, ⌈W/2⌉)`."""

    def __init__(self, in_channels: int, out_channels: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_channels, eps=eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(hidden_states))


class MscanStripConvolution(nn.Module):
    """One multi-scale branch of MSCA (Scale_i of Eq. 1): depthwise 1×k then k×1 convolutions, `(B, C, H, W)` kept."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.horizontal = nn.Conv2d(channels, channels, (1, kernel_size), padding=(0, kernel_size // 2), groups=channels)
        self.vertical = nn.Conv2d(channels, channels, (kernel_size, 1), padding=(kernel_size // 2, 0), groups=channels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.vertical(self.horizontal(hidden_states))


class MscanMultiScaleConvAttention(nn.Module):
    """MSCA (Eq. 1): ``Conv₁ₓ₁(a + Σ_i Scale_i(a)) ⊗ F`` with ``a = DW-Conv(F)``; `(B, C, H, W)` kept."""

    def __init__(self, config: MscanConfig, channels: int):
        super().__init__()
        kernel = config.attention_kernel_size
        self.depthwise_conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels)
        self.strip_convolutions = nn.ModuleList(
            MscanStripConvolution(channels, size) for size in config.strip_kernel_sizes
        )
        self.channel_mixing = nn.Conv2d(channels, channels, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        local = self.depthwise_conv(hidden_states)
        attention = local
        for branch in self.strip_convolutions:
            attention = attention + branch(local)
        return self.channel_mixing(attention) * hidden_states


class MscanSpatialAttention(nn.Module):
    """``output_projection(MSCA(GELU(input_projection(x)))) + x`` (1×1 projections), `(B, C, H, W)` kept."""

    def __init__(self, config: MscanConfig, channels: int):
        super().__init__()
        self.input_projection = nn.Conv2d(channels, channels, 1)
        self.activation = ACT2FN[config.hidden_act]
        self.msca = MscanMultiScaleConvAttention(config, channels)
        self.output_projection = nn.Conv2d(channels, channels, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        attended = self.msca(self.activation(self.input_projection(hidden_states)))
        return self.output_projection(attended) + hidden_states


class MscanMlp(nn.Module):
    """``fc2(GELU(DW-Conv₃ₓ₃(fc1(x))))`` with 1×1 ``fc1`` (C → r·C) and ``fc2`` (r·C → C), `(B, C, H, W)` kept."""

    def __init__(self, config: MscanConfig, channels: int, hidden_channels: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, hidden_channels, 1)
        self.depthwise_conv = nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1, groups=hidden_channels)
        self.activation = ACT2FN[config.hidden_act]
        self.fc2 = nn.Conv2d(hidden_channels, channels, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.depthwise_conv(self.fc1(hidden_states))))


class MscanBlock(GradientCheckpointingLayer):
    """``x + s₁·Attention(BN₁(x))`` then ``x + s₂·MLP(BN₂(x))`` with per-channel layer scales s₁, s₂ and stochastic
    depth on both branches; `(B, C, H, W)` kept."""

    def __init__(self, config: MscanConfig, channels: int, mlp_ratio: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels, eps=config.batch_norm_eps)
        self.attention = MscanSpatialAttention(config, channels)
        self.norm2 = nn.BatchNorm2d(channels, eps=config.batch_norm_eps)
        self.mlp = MscanMlp(config, channels, channels * mlp_ratio)
        self.drop_path = ConvNextDropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.layer_scale_1 = nn.Parameter(torch.full((channels,), float(config.layer_scale_init_value)))
        self.layer_scale_2 = nn.Parameter(torch.full((channels,), float(config.layer_scale_init_value)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        attended = layer_scaled(self.layer_scale_1[:, None, None], self.attention(self.norm1(hidden_states)))
        hidden_states = hidden_states + self.drop_path(attended)
        transformed = layer_scaled(self.layer_scale_2[:, None, None], self.mlp(self.norm2(hidden_states)))
        return hidden_states + self.drop_path(transformed)


class MscanStage(nn.Module):
    """Downsampling (stages 2–4; stage 1 follows the stem), MSCA blocks, LayerNorm over channels.

    `(B, C_{i-1}, H, W) -> (B, C_i, ⌈H/2⌉, ⌈W/2⌉)` (stage 1: `(B, C₁, H, W)` kept).
    """

    def __init__(self, config: MscanConfig, stage: int, drop_path_rates: list[float]):
        super().__init__()
        channels = config.hidden_sizes[stage]
        self.downsample = (
            MscanDownsample(config.hidden_sizes[stage - 1], channels, config.batch_norm_eps) if stage > 0 else None
        )
        self.blocks = nn.ModuleList(
            MscanBlock(config, channels, config.mlp_ratios[stage], rate) for rate in drop_path_rates
        )
        self.norm = nn.LayerNorm(channels, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            hidden_states = self.downsample(hidden_states)
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return self.norm(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MscanPreTrainedModel(PreTrainedModel):
    config: MscanConfig
    config_class = MscanConfig
    base_model_prefix = "mscan"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["MscanStage"]

    @torch.no_grad()
    def _init_weights(self, module):
        """The reference MSCAN init: convolutions ``N(0, √(2 / fan_out))`` with ``fan_out = k_h·k_w·C_out / groups``
        and zero bias, norms (1, 0), layer scales ``layer_scale_init_value``."""
        if isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, MscanBlock):
            init.constant_(module.layer_scale_1, self.config.layer_scale_init_value)
            init.constant_(module.layer_scale_2, self.config.layer_scale_init_value)


class MscanBackbone(BackboneMixin, MscanPreTrainedModel):
    """MSCAN feature extractor: `pixel_values (B, 3, H, W)` (any H, W) → the maps of ``config.out_features``,
    ``stem`` `(B, C₁, ⌈H/4⌉, ⌈W/4⌉)` and ``stage{i}`` `(B, C_i, H_i, W_i)` at strides 4, 8, 16, 32.

    ``hidden_states`` (with ``output_hidden_states=True``): the stem output and the four stage outputs.
    """

    has_attentions = False
    _can_record_outputs = {"hidden_states": MscanStage}

    def __init__(self, config: MscanConfig):
        super().__init__(config)
        self.num_features = [config.hidden_sizes[0]] + list(config.hidden_sizes)
        self.embeddings = MscanStem(config)
        total = sum(config.depths)
        rates = [config.drop_path_rate * index / max(total - 1, 1) for index in range(total)]  # linspace(0, rate)
        starts = [sum(config.depths[:stage]) for stage in range(len(config.depths))]
        self.stages = nn.ModuleList(
            MscanStage(config, stage, rates[start : start + depth])
            for stage, (start, depth) in enumerate(zip(starts, config.depths))
        )
        self.post_init()

    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> BackboneOutput:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must be (batch, {self.config.num_channels}, height, width), got shape "
                f"{tuple(pixel_values.shape)}"
            )
        hidden_states = self.embeddings(pixel_values)
        feature_maps = [hidden_states] if "stem" in self.out_features else []
        for name, stage in zip(self.stage_names[1:], self.stages):
            hidden_states = stage(hidden_states)
            if name in self.out_features:
                feature_maps.append(hidden_states)
        return BackboneOutput(feature_maps=tuple(feature_maps))


# --------------------------------------------------------------------------------------------------
# Light Hamburger head
# --------------------------------------------------------------------------------------------------


class SegNextConvNormAct(nn.Module):
    """1×1 convolution without bias, GroupNorm, and ReLU unless ``activation=False``: `(B, C_in, H, W) -> (B, C_out, H, W)`."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int, activation: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.norm = nn.GroupNorm(num_groups, out_channels)
        self.activation = nn.ReLU() if activation else nn.Identity()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.norm(self.conv(hidden_states)))


class SegNextNMF2D(nn.Module):
    """Non-negative matrix factorisation ``X ≈ D·Cᵀ`` of a feature map by multiplicative updates (the Hamburger's "ham").

    The map is viewed as ``X`` `(B, C, N = H·W)`; with R bases ``D`` `(B, C, R)` (uniform random, unit L2 norm over
    C) the coefficients start as ``C = softmax_R(inv_t · Xᵀ·D)`` `(B, N, R)`, then each of the
    ``nmf_eval_steps`` (evaluation) or ``nmf_train_steps`` (training) iterations updates

        C ← C ⊙ (Xᵀ·D) / (C·(Dᵀ·D) + 1e-6),   D ← D ⊙ (X·C) / (D·(Cᵀ·C) + 1e-6)

    a last coefficient update follows, and the output is the low-rank reconstruction ``D·Cᵀ`` as `(B, C, H, W)`.
    Gradients flow through every iteration, as in the reference.

    Where the initial bases come from:

    * given ``bases`` `(B, C, R)` (e.g. stored reference bases): used as they are;
    * training, or ``nmf_eval_seed=None``: ``normalize(torch.rand(B, C, R))`` from PyTorch's global CPU generator,
      one set per image, new at every forward — exactly the reference (``torch.manual_seed(s)`` before the
      forward reproduces a reference run with the same seed);
    * evaluation (default): one set drawn from ``torch.Generator().manual_seed(nmf_eval_seed)`` (the non-persistent
      buffer ``eval_bases``, the same draw as a fresh seeded generator at every forward would give), shared by the
      whole batch. Predictions are then a deterministic function of the image (the same in
      every call, process and batch composition) and the global random state is left untouched. The model
      still sees random-looking bases, only always the same ones: the reference's evaluation averages over
      bases draws, ours is one fixed draw (bases from another seed move reference logits by up to 0.8, the
      arg-max on a few percent of pixels).
    """

    def __init__(self, config: SegNextConfig):
        super().__init__()
        self.rank = config.nmf_rank
        self.train_steps = config.nmf_train_steps
        self.eval_steps = config.nmf_eval_steps
        self.inv_t = config.nmf_inv_t
        self.eval_seed = config.nmf_eval_seed
        self.channels = config.hamburger_channels
        # Not saved: re-derived from the seed (also when loading, by _init_weights). A buffer rather than a draw at
        # every forward, so that it follows .to() and torch.export keeps it as a constant.
        self.register_buffer("eval_bases", self.seeded_bases(), persistent=False)

    @staticmethod
    def draw_bases(batch: int, channels: int, rank: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random bases as the reference draws them: ``normalize(rand(batch, channels, rank), dim=1)`` on the CPU."""
        return F.normalize(torch.rand((batch, channels, rank), generator=generator, device="cpu"), dim=1)

    def seeded_bases(self) -> torch.Tensor:
        """The evaluation bases `(1, C, R)`: one draw from ``torch.Generator().manual_seed(nmf_eval_seed)`` (seed 0 if None)."""
        generator = torch.Generator(device="cpu").manual_seed(self.eval_seed if self.eval_seed is not None else 0)
        return self.draw_bases(1, self.channels, self.rank, generator)

    def initial_bases(self, batch: int, channels: int) -> torch.Tensor:
        """The bases this forward starts from, `(batch, channels, rank)`; see the class docstring."""
        if self.training or self.eval_seed is None:
            return self.draw_bases(batch, channels, self.rank)
        return self.eval_bases.expand(batch, -1, -1)

    @staticmethod
    def update_coefficients(x: torch.Tensor, bases: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        """``C ⊙ (Xᵀ·D) / (C·(Dᵀ·D) + 1e-6)``."""
        numerator = torch.bmm(x.transpose(1, 2), bases)
        denominator = coefficients.bmm(bases.transpose(1, 2).bmm(bases))
        return coefficients * numerator / (denominator + 1e-6)

    @staticmethod
    def update_bases(x: torch.Tensor, bases: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        """``D ⊙ (X·C) / (D·(Cᵀ·C) + 1e-6)``."""
        numerator = torch.bmm(x, coefficients)
        denominator = bases.bmm(coefficients.transpose(1, 2).bmm(coefficients))
        return bases * numerator / (denominator + 1e-6)

    def forward(self, hidden_states: torch.Tensor, bases: torch.Tensor | None = None) -> torch.Tensor:
        batch, channels, height, width = hidden_states.shape
        x = hidden_states.reshape(batch, channels, height * width)  # X: (B, C, N)
        if bases is None:
            bases = self.initial_bases(batch, channels)
        elif bases.shape != (batch, channels, self.rank):
            raise ValueError(
                f"nmf_bases must have shape (batch, channels, rank) = {(batch, channels, self.rank)}, "
                f"got {tuple(bases.shape)}"
            )
        bases = bases.to(device=x.device, dtype=x.dtype)
        coefficients = F.softmax(self.inv_t * torch.bmm(x.transpose(1, 2), bases), dim=-1)  # C: (B, N, R)
        for _ in range(self.train_steps if self.training else self.eval_steps):
            coefficients = self.update_coefficients(x, bases, coefficients)
            bases = self.update_bases(x, bases, coefficients)
        coefficients = self.update_coefficients(x, bases, coefficients)
        return torch.bmm(bases, coefficients.transpose(1, 2)).view(batch, channels, height, width)


class SegNextHamburger(nn.Module):
    """The Hamburger: ``relu(x + ham_out(NMF2D(relu(ham_in(x)))))`` with ``ham_in`` a 1×1 conv (with bias) and
    ``ham_out`` a 1×1 conv + GroupNorm; `(B, C, H, W)` kept."""

    def __init__(self, config: SegNextConfig):
        super().__init__()
        channels = config.hamburger_channels
        self.ham_in = nn.Conv2d(channels, channels, 1)
        self.nmf = SegNextNMF2D(config)
        self.ham_out = SegNextConvNormAct(channels, channels, config.decoder_num_groups, activation=False)

    def forward(self, hidden_states: torch.Tensor, nmf_bases: torch.Tensor | None = None) -> torch.Tensor:
        enjoyed = self.ham_out(self.nmf(F.relu(self.ham_in(hidden_states)), nmf_bases))
        return F.relu(hidden_states + enjoyed)


class SegNextLightHamHead(nn.Module):
    """The light Hamburger decode head without its classifier.

    `features`: the backbone maps, finest first (stages 2–4: `(B, C_i, H_i, W_i)`) → the aligned feature
    `(B, decoder_hidden_size, H₂, W₂)` at the resolution of the first map (stride 8).
    """

    def __init__(self, config: SegNextConfig, in_channels: list[int]):
        super().__init__()
        groups = config.decoder_num_groups
        self.squeeze = SegNextConvNormAct(sum(in_channels), config.hamburger_channels, groups)
        self.hamburger = SegNextHamburger(config)
        self.align = SegNextConvNormAct(config.hamburger_channels, config.decoder_hidden_size, groups)

    @staticmethod
    def concat(features: list[torch.Tensor]) -> torch.Tensor:
        """Every map bilinearly resized (align_corners=False) to the first one's size, concatenated: `(B, ΣC_i, H₂, W₂)`."""
        size = features[0].shape[-2:]
        resized = [features[0]] + [
            F.interpolate(level, size=size, mode="bilinear", align_corners=False) for level in features[1:]
        ]
        return torch.cat(resized, dim=1)

    def forward(self, features: list[torch.Tensor], nmf_bases: torch.Tensor | None = None) -> torch.Tensor:
        return self.align(self.hamburger(self.squeeze(self.concat(features)), nmf_bases))


# --------------------------------------------------------------------------------------------------
# SegNeXt
# --------------------------------------------------------------------------------------------------


class SegNextPreTrainedModel(PreTrainedModel):
    config: SegNextConfig
    config_class = SegNextConfig
    base_model_prefix = "segnext"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["MscanStage"]

    @torch.no_grad()
    def _init_weights(self, module):
        """The reference init of the head (MSCAN initialises itself): convolutions Kaiming-normal (fan-out, ReLU) with
        zero bias, the per-pixel classifier ``N(0, 0.01)``, norms (1, 0), offset learning truncated normal
        (std ``initializer_range``) for W and both projections; the NMF evaluation bases from their seed."""
        if isinstance(module, nn.Conv2d):
            if module is getattr(self, "classifier", None):
                init.normal_(module.weight, mean=0.0, std=0.01)
            else:
                init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, SegNextNMF2D):
            init.copy_(module.eval_bases, module.seeded_bases())
        elif isinstance(module, OffsetLearning):
            std = self.config.initializer_range
            init.trunc_normal_(module.class_embeddings, std=std)
            init.trunc_normal_(module.class_offset_proj.weight, std=std)
            init.trunc_normal_(module.feature_offset_proj.weight, std=std)


class SegNextForSemanticSegmentation(SegNextPreTrainedModel):
    """SegNeXt for semantic segmentation: `pixel_values (B, 3, H, W)` (any H, W) → logits `(B, K, H₈, W₈)` at stride 8
    (``H₈ = ⌈⌈⌈H/2⌉/2⌉/2⌉``, ⌈H/8⌉ for sides that are multiples of 8), before any resize, as the reference.

    With ``labels (B, H_l, W_l)`` the loss is the cross-entropy of the logits bilinearly upsampled to the label
    size, ignoring ``config.semantic_loss_ignore_index``. ``nmf_bases`` `(B, hamburger_channels, nmf_rank)`
    replaces the Hamburger's initial NMF bases (to reproduce a given reference run). ``hidden_states`` (on
    request): the stem and the four MSCAN stage outputs.

    Example:

    ```python
    >>> from offseg_hf import SegNextConfig, SegNextForSemanticSegmentation
    >>> model = SegNextForSemanticSegmentation(SegNextConfig.from_preset("segnext-t-offset", num_labels=150)).eval()
    >>> model(torch.randn(1, 3, 97, 131)).logits.shape
    torch.Size([1, 150, 13, 17])
    ```
    """

    def __init__(self, config: SegNextConfig):
        check_num_labels(config.num_labels, "SegNeXt")  # the config's own check, for a config changed after it was built
        super().__init__(config)
        self.backbone = MscanBackbone(config.backbone_config)
        self.decode_head = SegNextLightHamHead(config, self.backbone.channels)
        if config.classifier == "offset_learning":
            self.offset_learning = OffsetLearning(config.decoder_hidden_size, config.num_labels)
        else:
            self.dropout = nn.Dropout2d(config.classifier_dropout_prob)
            self.classifier = nn.Conv2d(config.decoder_hidden_size, config.num_labels, 1)
        self.post_init()

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """The classifier: aligned features `(B, C, h, w)` → logits `(B, K, h, w)`."""
        if self.config.classifier == "offset_learning":
            return self.offset_learning(features)
        return self.classifier(self.dropout(features))

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        nmf_bases: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SemanticSegmenterOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`): normalised images, any size.
        labels (`torch.LongTensor` of shape `(B, H_l, W_l)`, *optional*): class indices for the loss.
        nmf_bases (`torch.FloatTensor` of shape `(B, hamburger_channels, nmf_rank)`, *optional*): initial NMF bases.
        """
        outputs = self.backbone(pixel_values, **kwargs)
        features = self.decode_head(list(outputs.feature_maps), nmf_bases)
        logits = self.classify(features)
        loss = None
        if labels is not None:
            loss = semantic_segmentation_loss(logits, labels, self.config.semantic_loss_ignore_index)
        return SemanticSegmenterOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


# save_pretrained writes an ``auto_map`` and copies these files (and the siblings they import), so a saved folder
# also loads with ``trust_remote_code=True`` where offseg_hf is not installed. The Auto* registrations live in
# offseg_hf/models/__init__.py.
MscanBackbone.register_for_auto_class("AutoBackbone")
SegNextForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")

__all__ = [
    "MscanBackbone",
    "MscanPreTrainedModel",
    "SegNextForSemanticSegmentation",
    "SegNextHamburger",
    "SegNextLightHamHead",
    "SegNextNMF2D",
    "SegNextPreTrainedModel",
]
