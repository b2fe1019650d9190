"""EfficientFormerV2 as a Transformers backbone, in the segmentation form used by OffSeg.

EfficientFormerV2 (Li et al., ICCV 2023) is a four-stage hybrid network. Every block is a residual MLP with
a depthwise 3×3 convolution inside; the last blocks of stages 3 and 4 add multi-head self-attention, and the
stage-3 → stage-4 downsampling attends too. This file reproduces the segmentation backbone OffSeg trains
(``efficientformerv2_{s1,s2,l}_feat`` in the reference code):

* attention biases are relative-position tables laid out for a 512×512 input (a 16×16 token grid in every
  attention, 16×16 queries over 32×32 keys in the downsampling attention);
* at any other input size the gathered ``(heads, N_q, N_k)`` bias matrix is resized bicubically to the
  actual ``(N_q, N_k)`` as if it were an image (identity at 512×512);
* the outputs are the four stage outputs (strides 4, 8, 16, 32), with no extra normalisation.

Inputs must have sides divisible by 32 (the stage-3 attention halves an even grid);
[`OffSegForSemanticSegmentation`] pads arbitrary images to that.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_offseg import EfficientFormerV2Config
from .precision import compute_dtype, layer_scaled


def relative_position_index(query_grid: int, key_grid: int) -> tuple[torch.Tensor, int]:
    """Index of the bias of every (query, key) pair in the table of relative offsets ``(|Δy|, |Δx|)``.

    Queries sit on a ``query_grid × query_grid`` lattice with spacing ``s = ⌈key_grid / query_grid⌉`` (1 for
    self-attention, 2 for the downsampling attention) over a ``key_grid × key_grid`` key lattice. The offset of
    a pair is ``(|s·q_y − k_y|, |s·q_x − k_x|)`` and sits in slot ``|Δy|·key_grid + |Δx|`` — the reference's
    "order of first appearance", which the query at the origin fixes to exactly this raster order.

    Returns:
        `(index, table_size)`: `index` of shape `(query_grid**2, key_grid**2)` (int64), ``table_size = key_grid**2``.
    """
    stride = math.ceil(key_grid / query_grid)
    query = torch.stack(torch.meshgrid(torch.arange(query_grid), torch.arange(query_grid), indexing="ij")).flatten(1)
    key = torch.stack(torch.meshgrid(torch.arange(key_grid), torch.arange(key_grid), indexing="ij")).flatten(1)
    offset = (stride * query[:, :, None] - key[:, None, :]).abs()  # (2, N_q, N_k): |Δy|, |Δx|
    return offset[0] * key_grid + offset[1], key_grid**2


def pointwise_conv(
    hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, channels_last: bool = False
) -> torch.Tensor:
    """A 1×1 convolution `(B, C_in, H, W) -> (B, C_out, H, W)` computed as one batched matrix product ``W · X[b]``.

    The same function as ``F.conv2d(x, weight, bias)``; on CPU 1.3–2.2× faster for NCHW float32 maps (oneDNN
    reorders NCHW maps to its blocked layout and back around every convolution: 256→256 channels at 128×128,
    6.7 vs 14.7 ms), and its backward is two more matrix products. The input may be NCHW or channels-last.

    Args:
        channels_last: return the result in channels-last memory layout (``X[b]ᵀ · Wᵀ``, same values), the layout
            in which oneDNN runs a following depthwise convolution without reordering (3×3 over 128 channels at
            128×128: 1.9–2.4 vs 4–14 ms NCHW over several runs).

    Compiled or exported (``torch.compile``, ``torch.export`` / ONNX) it stays a convolution: inductor plans the
    layouts of its convolutions itself, and the matrix-product forms of this function, of the talking heads and of
    :func:`upsample_bilinear_2x` made compiled OffSeg-T slower (222 vs 169 ms at 512², 2 CPU threads).
    """
    if torch.compiler.is_compiling():
        return F.conv2d(hidden_states, weight, bias)
    dtype = compute_dtype(hidden_states, weight)  # autocast's dtype under autocast, as F.conv2d would run in
    hidden_states, weight = hidden_states.to(dtype), weight.to(dtype)  # (no-ops when already in it)
    bias = None if bias is None else bias.to(dtype)
    batch, channels, height, width = hidden_states.shape
    matrix = weight.view(weight.shape[0], channels).expand(batch, -1, -1)
    pixels = hidden_states.reshape(batch, channels, height * width)
    if channels_last:
        pixels, matrix = pixels.transpose(1, 2), matrix.transpose(1, 2)  # Xᵀ (B, HW, C_in), Wᵀ (B, C_in, C_out)
        output = torch.bmm(pixels, matrix) if bias is None else torch.baddbmm(bias.view(1, 1, -1), pixels, matrix)
        return output.transpose(1, 2).unflatten(2, (height, width))  # (B, HW, C_out) viewed as (B, C_out, H, W)
    if bias is None:
        output = torch.bmm(matrix, pixels)
    else:
        output = torch.baddbmm(bias.view(1, -1, 1), matrix, pixels)
    return output.view(batch, -1, height, width)


class PointwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1)`` (same parameters and function) run by :func:`pointwise_conv`;
    ``forward(x, channels_last=True)`` returns the result in channels-last memory layout."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, hidden_states: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        return pointwise_conv(hidden_states, self.weight, self.bias, channels_last)


class EfficientFormerV2ConvNorm(nn.Sequential):
    """Conv2d followed by BatchNorm2d: `(B, C_in, H, W) -> (B, C_out, H / stride, W / stride)`."""

    conv_norm_pairs = (("conv", "norm"),)

    def __init__(self, in_channels, out_channels, kernel_size=1, stride=1, groups=1, eps=1e-5):
        super().__init__()
        if kernel_size == 1 and stride == 1 and groups == 1:
            self.conv = PointwiseConv2d(in_channels, out_channels)
        else:
            self.conv = nn.Conv2d(
                in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups
            )
        self.norm = nn.BatchNorm2d(out_channels, eps=eps)


class EfficientFormerV2RelativePositionBias(nn.Module):
    """Learned relative-position bias added to attention logits, resized to the actual token counts.

    The table ``attention_biases`` (heads × distinct offsets) is gathered into a `(heads, N_q, N_k)` matrix laid
    out for the layout resolution, which is then resized bicubically (align_corners=False) to the actual
    `(N_q, N_k)` as if it were an image. The resize is the identity, bit for bit, at the layout resolution.

    Exported (``torch.export``, ONNX) the resize is always applied, so the graph has no branch on the input size
    and serves dynamic shapes. Elsewhere the identity resize is skipped (``torch.compile`` guards on the size), and
    run eagerly without gradients the bias is cached per size and weights (as Transformers' LeViT caches its
    biases in eval mode).
    """

    def __init__(self, num_heads: int, query_grid: int, key_grid: int):
        super().__init__()
        index, table_size = relative_position_index(query_grid, key_grid)
        self.query_grid, self.key_grid = query_grid, key_grid
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, table_size))
        self.register_buffer("attention_bias_idxs", index, persistent=False)
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def _resized(self, num_queries: int, num_keys: int, skip_identity: bool) -> torch.Tensor:
        bias = self.attention_biases[:, self.attention_bias_idxs].unsqueeze(0)
        if skip_identity and (num_queries, num_keys) == (self.query_grid**2, self.key_grid**2):
            return bias
        return F.interpolate(bias, size=(num_queries, num_keys), mode="bicubic", align_corners=False)

    def forward(self, num_queries: int, num_keys: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Returns the bias of shape `(1, heads, num_queries, num_keys)` in ``dtype`` (the attention uses its logits'
        dtype, so that a float32 table does not promote bfloat16 logits under autocast; cached in that dtype), by
        default the table's."""
        dtype = self.attention_biases.dtype if dtype is None else dtype
        if torch.compiler.is_compiling():  # torch.export keeps the size-independent graph; torch.compile guards on it
            return self._resized(num_queries, num_keys, skip_identity=not torch.compiler.is_exporting()).to(dtype)
        if torch.is_grad_enabled():
            return self._resized(num_queries, num_keys, skip_identity=True).to(dtype)
        table = self.attention_biases
        key = (num_queries, num_keys, dtype, table.device, table.dtype, table.data_ptr(), table._version)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._resized(num_queries, num_keys, skip_identity=True).to(dtype))
        return self._cache[1]


def upsample_bilinear_2x(hidden_states: torch.Tensor) -> torch.Tensor:
    """Bilinear ×2 upsampling, align_corners=False (``nn.Upsample(scale_factor=2, mode="bilinear")``): `(B, C, H, W)
    -> (B, C, 2H, 2W)`.

    Written as a depthwise transposed convolution with the separable kernel ``[¼, ¾, ¾, ¼]`` on the edge-replicated
    input: the same values up to float rounding (≤ 5e-7 measured), and 14× faster on CPU at the stage-3 shape
    (1024 channels of 16×16: 0.55 vs 7.5 ms), where aten's NCHW kernel converts to channels-last and back.
    Compiled or exported, the interpolation itself is traced (see :func:`pointwise_conv`).
    """
    if torch.compiler.is_compiling():
        return F.interpolate(hidden_states, scale_factor=2, mode="bilinear", align_corners=False)
    channels = hidden_states.shape[1]
    # In autocast's dtype under autocast (CPU autocast would run the replicate padding in float32 and cast the
    # padded map back for the convolution); the kernel's values are exact in every float dtype.
    hidden_states = hidden_states.to(compute_dtype(hidden_states))
    taps = hidden_states.new_tensor([0.25, 0.75, 0.75, 0.25])
    weight = (taps[:, None] * taps[None, :]).expand(channels, 1, 4, 4)
    with torch.autocast(hidden_states.device.type, enabled=False):
        padded = F.pad(hidden_states, (1, 1, 1, 1), mode="replicate")
        return F.conv_transpose2d(padded, weight, stride=2, padding=3, groups=channels)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q kᵀ · scaling + bias) v``: `(B, heads, N_q, d)`, `(B, heads, N_k, d)`, `(B, heads, N_k, d_v)` →
    output `(B, N_q, heads, d_v)` and weights `(B, heads, N_q, N_k)` (the additive bias is ``attention_mask``)."""
    attention = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attention = attention + attention_mask
    attention = attention.softmax(dim=-1)
    attention = F.dropout(attention, p=dropout, training=module.training)
    return torch.matmul(attention, value).transpose(1, 2).contiguous(), attention


class EfficientFormerV2TalkingHead(PointwiseConv2d):
    """Talking heads: a 1×1 convolution across the heads of attention logits, `(B, heads, N_q, N_k)` → same shape
    (as a matrix product, 6× faster on CPU than the convolution for 8 heads of 256×256 logits: 0.12 vs 0.72 ms)."""

    def __init__(self, heads: int):
        super().__init__(heads, heads)


class EfficientFormerV2Attention(nn.Module):
    """Multi-head self-attention of stages 3 and 4 with talking heads and a local value branch.

    `(B, C, H, W) -> (B, C, H, W)`. In stage 3 (``stride=2``) q/k/v are computed on a depthwise stride-2
    convolution of the input and the result is upsampled bilinearly back to `(H, W)`.

        attn = softmax(T1(q kᵀ · d_k^-1/2 + bias)) then T2(attn),  out = proj(GELU(up(attn v + local(v))))

    where T1, T2 are 1×1 convolutions across heads ("talking heads").
    """

    def __init__(self, config: EfficientFormerV2Config, dim: int, grid: int, stride: int | None = None):
        super().__init__()
        heads, key_dim = config.num_attention_heads, config.key_dim
        self.num_heads = heads
        self.scale = key_dim**-0.5
        value_dim = config.attention_ratio * key_dim * heads
        eps = config.batch_norm_eps
        if stride is not None:
            self.stride_conv = EfficientFormerV2ConvNorm(dim, dim, 3, stride=stride, groups=dim, eps=eps)
            if stride != 2:
                raise ValueError(f"the strided attention of EfficientFormerV2 halves its grid (stride 2), got {stride}")
            grid = math.ceil(grid / stride)
        else:
            self.stride_conv = None
        self.q = EfficientFormerV2ConvNorm(dim, key_dim * heads, eps=eps)
        self.k = EfficientFormerV2ConvNorm(dim, key_dim * heads, eps=eps)
        self.v = EfficientFormerV2ConvNorm(dim, value_dim, eps=eps)
        self.v_local = EfficientFormerV2ConvNorm(value_dim, value_dim, 3, groups=value_dim, eps=eps)
        self.talking_head1 = EfficientFormerV2TalkingHead(heads)
        self.talking_head2 = EfficientFormerV2TalkingHead(heads)
        self.relative_position = EfficientFormerV2RelativePositionBias(heads, grid, grid)
        self.act = ACT2FN[config.hidden_act]
        self.proj = EfficientFormerV2ConvNorm(value_dim, dim, eps=eps)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, C, H, W)` → output `(B, C, H, W)` and attention weights `(B, heads, N, N)` (after ``talking_head2``,
        i.e. the weights that multiply the values; N = tokens of the attention grid)."""
        if self.stride_conv is not None:
            hidden_states = self.stride_conv(hidden_states)
        batch, _, height, width = hidden_states.shape
        tokens = height * width
        query = self.q(hidden_states).reshape(batch, self.num_heads, -1, tokens).transpose(2, 3)
        key = self.k(hidden_states).reshape(batch, self.num_heads, -1, tokens)
        value = self.v(hidden_states)
        value_local = self.v_local(value)
        value = value.reshape(batch, self.num_heads, -1, tokens).transpose(2, 3)

        # Talking heads mix the heads before and after the softmax, so this is not a plain softmax attention
        # and always runs eagerly (the downsampling attention below uses Transformers' attention interface).
        attention = query @ key
        attention = attention * self.scale + self.relative_position(tokens, tokens, compute_dtype(query))
        attention = self.talking_head2(self.talking_head1(attention).softmax(dim=-1))
        context = (attention @ value).transpose(2, 3).reshape(batch, -1, height, width) + value_local
        if self.stride_conv is not None:
            context = upsample_bilinear_2x(context)
        return self.proj(self.act(context)), attention


class EfficientFormerV2LocalGlobalQuery(nn.Module):
    """Query of the downsampling attention: `(B, C, H, W) -> (B, C_q, H/2, W/2)`.

    ``proj(dwconv3×3_s2(x) + x[:, :, ::2, ::2])`` (the second term is a 1×1 average pool with stride 2).
    """

    def __init__(self, in_dim: int, out_dim: int, eps: float):
        super().__init__()
        self.local = nn.Conv2d(in_dim, in_dim, 3, stride=2, padding=1, groups=in_dim)
        self.pool = nn.AvgPool2d(1, 2, 0)
        self.proj = EfficientFormerV2ConvNorm(in_dim, out_dim, eps=eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(self.local(hidden_states) + self.pool(hidden_states))


class EfficientFormerV2AttentionDownsample(nn.Module):
    """Attention that halves the resolution (stage 3 → 4): `(B, C, H, W) -> (B, C_out, H/2, W/2)`.

    Queries come from the stride-2 grid (local + pooled), keys and values from the full grid; no talking heads.
    """

    def __init__(self, config: EfficientFormerV2Config, dim: int, out_dim: int, grid: int):
        super().__init__()
        heads, key_dim = config.downsample_num_attention_heads, config.downsample_key_dim
        self.config = config
        self.num_heads = heads
        self.scale = key_dim**-0.5
        self.is_causal = False
        value_dim = config.attention_ratio * key_dim * heads
        eps = config.batch_norm_eps
        self.q = EfficientFormerV2LocalGlobalQuery(dim, key_dim * heads, eps)
        self.k = EfficientFormerV2ConvNorm(dim, key_dim * heads, eps=eps)
        self.v = EfficientFormerV2ConvNorm(dim, value_dim, eps=eps)
        self.v_local = EfficientFormerV2ConvNorm(value_dim, value_dim, 3, stride=2, groups=value_dim, eps=eps)
        self.relative_position = EfficientFormerV2RelativePositionBias(heads, math.ceil(grid / 2), grid)
        self.act = ACT2FN[config.hidden_act]
        self.proj = EfficientFormerV2ConvNorm(value_dim, out_dim, eps=eps)

    def forward(
        self, hidden_states: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(B, C, H, W)` → output `(B, C_out, H/2, W/2)` and attention weights `(B, heads, HW/4, HW)` (eager only)."""
        batch, _, height, width = hidden_states.shape
        num_keys, num_queries = height * width, (height // 2) * (width // 2)
        query = self.q(hidden_states).reshape(batch, self.num_heads, -1, num_queries).transpose(2, 3)
        key = self.k(hidden_states).reshape(batch, self.num_heads, -1, num_keys).transpose(2, 3)
        value = self.v(hidden_states)
        value_local = self.v_local(value)
        value = value.reshape(batch, self.num_heads, -1, num_keys).transpose(2, 3)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        bias = self.relative_position(num_queries, num_keys, compute_dtype(query))
        # context: (B, N_q, heads, d_v)
        context, attention = attention_interface(self, query, key, value, bias, scaling=self.scale, **kwargs)
        context = context.permute(0, 2, 3, 1).reshape(batch, -1, height // 2, width // 2) + value_local
        return self.proj(self.act(context)), attention


class EfficientFormerV2Downsample(nn.Module):
    """Stride-2 patch merging between stages: `(B, C_in, H, W) -> (B, C_out, H/2, W/2)`.

    ``BN(conv3×3_s2(x))``, plus the downsampling attention for the stage-3 → stage-4 transition.
    """

    def __init__(self, config: EfficientFormerV2Config, in_dim: int, out_dim: int, grid: int, use_attention: bool):
        super().__init__()
        self.conv = EfficientFormerV2ConvNorm(in_dim, out_dim, 3, stride=2, eps=config.batch_norm_eps)
        self.attention = (
            EfficientFormerV2AttentionDownsample(config, in_dim, out_dim, grid) if use_attention else None
        )

    def forward(self, hidden_states: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> torch.Tensor:
        output = self.conv(hidden_states)
        if self.attention is not None:
            output = self.attention(hidden_states, **kwargs)[0] + output
        return output


class EfficientFormerV2PointwiseConv(PointwiseConv2d):
    """1×1 convolution of the MLP (a type of its own: it gets the truncated-normal init)."""


class EfficientFormerV2Mlp(nn.Module):
    """Convolutional MLP: `fc1 → BN → act → dw3×3 → BN → act → fc2 → BN`, `(B, C, H, W) -> (B, C, H, W)`.

    For inference (no autograd graph recorded) the hidden map between fc1 and fc2 is channels-last in memory, in
    which oneDNN runs the depthwise 3×3 without reordering (see :func:`pointwise_conv`; interleaved A/B of this
    layout alone: OffSeg-T 0.955× its eager time with NCHW hidden maps); a training step keeps it NCHW (1.14×
    slower channels-last: BatchNorm and the depthwise backward). fc2 returns NCHW either way.
    """

    conv_norm_pairs = (("fc1", "norm1"), ("depthwise", "depthwise_norm"), ("fc2", "norm2"))

    def __init__(self, config: EfficientFormerV2Config, dim: int, hidden_dim: int):
        super().__init__()
        eps = config.batch_norm_eps
        self.fc1 = EfficientFormerV2PointwiseConv(dim, hidden_dim)
        self.norm1 = nn.BatchNorm2d(hidden_dim, eps=eps)
        self.depthwise = nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim)
        self.depthwise_norm = nn.BatchNorm2d(hidden_dim, eps=eps)
        self.fc2 = EfficientFormerV2PointwiseConv(hidden_dim, dim)
        self.norm2 = nn.BatchNorm2d(dim, eps=eps)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        channels_last = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        # (fc1 is called with the keyword only when it is set: PT2E quantisation runs it as a plain nn.Conv2d)
        hidden_states = self.fc1(hidden_states, channels_last=True) if channels_last else self.fc1(hidden_states)
        hidden_states = self._activate(self.norm1(hidden_states), channels_last)
        hidden_states = self._activate(self.depthwise_norm(self.depthwise(hidden_states)), channels_last)
        return self.norm2(self.fc2(hidden_states))

    def _activate(self, hidden_states: torch.Tensor, channels_last: bool) -> torch.Tensor:
        """``act``; of a channels-last map through its contiguous `(B, H, W, C)` view (torch 2.14's CPU GELU takes
        2× longer on a channels-last NCHW tensor than on the same memory seen as contiguous)."""
        if not channels_last:
            return self.act(hidden_states)
        return self.act(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class EfficientFormerV2DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or at rate 0)."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep = 1.0 - self.drop_prob
        mask = hidden_states.new_empty((hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)).bernoulli_(keep)
        return hidden_states * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class EfficientFormerV2Block(GradientCheckpointingLayer):
    """One block: ``x = x + s1·Attention(x)`` (attention blocks only), then ``x = x + s2·Mlp(x)``.

    `s1`, `s2` are per-channel layer scales of shape `(C, 1, 1)`.
    """

    def __init__(
        self,
        config: EfficientFormerV2Config,
        dim: int,
        mlp_ratio: float,
        drop_path: float,
        grid: int | None = None,
        stride: int | None = None,
    ):
        super().__init__()
        if grid is not None:
            self.attention = EfficientFormerV2Attention(config, dim, grid, stride)
            self.layer_scale_1 = nn.Parameter(torch.full((dim, 1, 1), config.layer_scale_init_value))
        else:
            self.attention = None
            self.layer_scale_1 = None
        self.mlp = EfficientFormerV2Mlp(config, dim, int(dim * mlp_ratio))
        self.layer_scale_2 = nn.Parameter(torch.full((dim, 1, 1), config.layer_scale_init_value))
        self.drop_path = EfficientFormerV2DropPath(drop_path)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.attention is not None:
            hidden_states = hidden_states + self.drop_path(layer_scaled(self.layer_scale_1, self.attention(hidden_states)[0]))
        return hidden_states + self.drop_path(layer_scaled(self.layer_scale_2, self.mlp(hidden_states)))


class EfficientFormerV2Stem(nn.Sequential):
    """Two stride-2 3×3 conv + BN + act: `(B, 3, H, W) -> (B, C_1, H/4, W/4)`."""

    def __init__(self, config: EfficientFormerV2Config):
        super().__init__()
        out_dim, eps = config.hidden_sizes[0], config.batch_norm_eps
        self.conv1 = EfficientFormerV2ConvNorm(config.num_channels, out_dim // 2, 3, stride=2, eps=eps)
        self.act1 = ACT2FN[config.hidden_act]
        self.conv2 = EfficientFormerV2ConvNorm(out_dim // 2, out_dim, 3, stride=2, eps=eps)
        self.act2 = ACT2FN[config.hidden_act]


class EfficientFormerV2Stage(nn.Module):
    """Optional downsampling, then the stage's blocks: `(B, C_prev, 2H, 2W) -> (B, C, H, W)`."""

    def __init__(self, config: EfficientFormerV2Config, stage: int, drop_path_rates: list[float]):
        super().__init__()
        dim = config.hidden_sizes[stage]
        # Token grid of this stage for the layout resolution (32 for stage 3 and 16 for stage 4 at 512×512).
        grid = math.ceil(config.attention_bias_resolution / 2 ** (stage + 2))
        if stage == 0:
            self.downsample = None
        else:
            previous_grid = math.ceil(config.attention_bias_resolution / 2 ** (stage + 1))
            self.downsample = EfficientFormerV2Downsample(
                config, config.hidden_sizes[stage - 1], dim, previous_grid, use_attention=stage == 3
            )
        depth = config.depths[stage]
        first_attention = depth - config.num_attention_blocks[stage]
        offset = sum(config.depths[:stage])
        self.blocks = nn.ModuleList(
            EfficientFormerV2Block(
                config,
                dim,
                config.mlp_expansion_ratios[stage][index],
                drop_path_rates[offset + index],
                grid=grid if index >= first_attention else None,
                stride=2 if stage == 2 else None,
            )
            for index in range(depth)
        )

    def forward(self, hidden_states: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> torch.Tensor:
        if self.downsample is not None:
            hidden_states = self.downsample(hidden_states, **kwargs)
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return hidden_states


class EfficientFormerV2PreTrainedModel(PreTrainedModel):
    config: EfficientFormerV2Config
    config_class = EfficientFormerV2Config
    base_model_prefix = "efficientformer_v2"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["EfficientFormerV2Stage"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {
        # The first stage's input is the stem output: hidden_states = (stem, stage1, …, stage4).
        "hidden_states": OutputRecorder(EfficientFormerV2Stage),
        "attentions": [
            OutputRecorder(EfficientFormerV2Attention, index=1),
            OutputRecorder(EfficientFormerV2AttentionDownsample, index=1),
        ],
    }

    @torch.no_grad()
    def _init_weights(self, module):
        """Reference init: MLP 1×1 convs truncated normal (std ``initializer_range``, bias 0), other convs PyTorch's
        default, BatchNorm (1, 0), layer scales ``layer_scale_init_value``, attention biases 0."""
        if isinstance(module, EfficientFormerV2PointwiseConv):
            init.trunc_normal_(module.weight, std=self.config.initializer_range)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            module.reset_parameters()
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)
        elif isinstance(module, EfficientFormerV2RelativePositionBias):
            init.zeros_(module.attention_biases)
            init.copy_(module.attention_bias_idxs, relative_position_index(module.query_grid, module.key_grid)[0])
        elif isinstance(module, EfficientFormerV2Block):
            for scale in (module.layer_scale_1, module.layer_scale_2):
                if scale is not None:
                    init.constant_(scale, self.config.layer_scale_init_value)


class EfficientFormerV2Backbone(BackboneMixin, EfficientFormerV2PreTrainedModel):
    """EfficientFormerV2 feature extractor: `pixel_values (B, 3, H, W)` with H, W divisible by 32 →
    feature maps of the selected stages, `(B, C_i, H / 2^(i+1), W / 2^(i+1))` for ``stage{i}``.

    ``hidden_states`` (``output_hidden_states=True``) are the stem output followed by the four stage outputs;
    ``attentions`` (``output_attentions=True``) the weights of every attention block of stages 3 and 4 and of
    the stage-3 → stage-4 downsampling attention, in order.
    """

    has_attentions = True

    def __init__(self, config: EfficientFormerV2Config):
        super().__init__(config)
        self.num_features = [config.hidden_sizes[0]] + list(config.hidden_sizes)
        self.embeddings = EfficientFormerV2Stem(config)
        total = sum(config.depths)
        rates = [config.drop_path_rate * index / max(total - 1, 1) for index in range(total)]
        self.stages = nn.ModuleList(EfficientFormerV2Stage(config, stage, rates) for stage in range(4))
        self.post_init()

    @can_return_tuple
    @capture_outputs(tie_last_hidden_states=False)
    def forward(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> BackboneOutput:
        r"""
        pixel_values (`torch.Tensor` of shape `(B, num_channels, H, W)`): images, H and W divisible by 32.

        Returns `BackboneOutput` with `feature_maps` (one map per `out_features`), and `hidden_states` /
        `attentions` when requested.
        """
        height, width = pixel_values.shape[-2:]
        if height % 32 or width % 32:
            raise ValueError(
                f"EfficientFormerV2Backbone needs input sides divisible by 32, got {height}×{width}; "
                "pad the input (OffSegForSemanticSegmentation does this for you)"
            )
        hidden_states = self.embeddings(pixel_values)
        stage_outputs = {"stem": hidden_states}
        for name, stage in zip(self.stage_names[1:], self.stages):
            hidden_states = stage(hidden_states, **kwargs)
            stage_outputs[name] = hidden_states
        return BackboneOutput(feature_maps=tuple(stage_outputs[name] for name in self.out_features))


def fold_batch_norm(model: nn.Module) -> int:
    """Fold every BatchNorm of EfficientFormerV2 into the convolution before it, for inference.

    Each module declaring ``conv_norm_pairs`` gets its convolution replaced by the fused one
    (:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`: ``W' = W·γ/σ``, ``b' = (b − μ)·γ/σ + β``) and the BatchNorm
    by ``nn.Identity``, which removes one pass over every normalised activation. The model computes the same
    function in eval mode (to float rounding), but can no longer be trained or saved in the checkpoint layout:
    fold a model only to run it. Returns the number of folded pairs; raises in training mode.
    """
    if model.training:
        raise ValueError("fold_batch_norm needs a model in eval mode (model.eval()): BatchNorm folds its running statistics")
    folded = 0
    for module in list(model.modules()):
        for conv_name, norm_name in getattr(module, "conv_norm_pairs", ()):
            norm = getattr(module, norm_name)
            if isinstance(norm, nn.BatchNorm2d):
                setattr(module, conv_name, torch.nn.utils.fusion.fuse_conv_bn_eval(getattr(module, conv_name), norm))
                setattr(module, norm_name, nn.Identity())
                folded += 1
    return folded


__all__ = [
    "EfficientFormerV2Backbone",
    "EfficientFormerV2PreTrainedModel",
    "PointwiseConv2d",
    "fold_batch_norm",
    "pointwise_conv",
]
