"""OffSeg: EfficientFormerV2 + FreqFusion decoder + offset learning (ICCV 2025).

"Revisiting Efficient Semantic Segmentation: Learning Offsets for Better Spatial and Class Feature
Alignment". Where a per-pixel classifier computes masks ``M = W·Eᵀ`` from fixed class embeddings W (K×C)
and pixel features E (HW×C), OffSeg learns offsets for both before that product:

* coupled attention ``A = W·Eᵀ`` (K×HW, Eq. 4);
* class offset: softmax of A over pixels pools the features of each class, a linear layer turns the
  pooled features into ``ΔW`` (Eq. 5–8);
* feature offset: softmax of A over classes mixes the class embeddings at each pixel, a linear layer turns
  the mixture into ``ΔE`` (Eq. 9–12);
* masks ``M = (E + ΔE)·(W + ΔW)ᵀ`` followed by a LayerNorm over the K class scores (Eq. 13).

The network (paper Fig. 4): EfficientFormerV2 backbone → per-stage 1×1 conv + GroupNorm + ReLU → three
FreqFusion fusions from stride 32 to stride 4 (adaptive low-pass / high-pass CARAFE filters and a
similarity-guided resampler) → align 1×1 conv + GroupNorm + ReLU → offset learning → logits at stride 4.

Parts, by paper name: :func:`carafe`, :class:`OffSegFreqFusion` (ALPF ``lowpass_encoder``, AHPF
``highpass_encoder``), :class:`OffSegSimilaritySampler`, :class:`~offseg_hf.models.offset_learning.OffsetLearning`,
:class:`OffSegDecoder`, :class:`OffSegModel`, :class:`OffSegForSemanticSegmentation`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.backbone_utils import load_backbone
from transformers.modeling_outputs import BaseModelOutput, SemanticSegmenterOutput
from transformers.modeling_utils import PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple

from .configuration_offseg import EfficientFormerV2Config, OffSegConfig
from .loss import semantic_segmentation_loss
from .modeling_efficientformer_v2 import EfficientFormerV2Backbone, PointwiseConv2d
from .offset_learning import OffsetLearning, check_num_labels
from .precision import autocast_functions, compute_dtype

# Inputs are padded to a multiple of this (the backbone's total stride; its stage-3 attention halves the grid).
INPUT_MULTIPLE = 32


def _carafe_layout(batch: int, groups: int, height: int, width: int, radius: int) -> tuple[int, int, int]:
    """Rows per stacked image, padded row width and number of computed positions of :func:`carafe`'s layout."""
    rows, cols = height + 2 * radius, width + 2 * radius
    return rows, cols, batch * groups * rows * cols


def _carafe_stack_features(features: torch.Tensor, groups: int, radius: int, channel_multiple: int = 1) -> torch.Tensor:
    """`(B, C, h, w)` -> zero-padded pixel-major buffer `(B·G·(h+2r) + 2r + 1, w + 2r, C')`, C' = C/G rounded up
    to a multiple of ``channel_multiple`` (the extra channels are zero).

    The B·G padded images are stacked along the rows, so the k×k window of every output position is an
    overlapping strided view of one buffer (:func:`_carafe_window_row`) with a single batch stride.
    """
    batch, channels, height, width = features.shape
    rows, cols, _ = _carafe_layout(batch, groups, height, width, radius)
    group_channels = channels // groups
    padded_channels = -(-group_channels // channel_multiple) * channel_multiple
    buffer = features.new_zeros(batch * groups * rows + 2 * radius + 1, cols, padded_channels)
    images = buffer[: batch * groups * rows].view(batch, groups, rows, cols, padded_channels)
    images[:, :, radius : radius + height, radius : radius + width, :group_channels] = features.reshape(
        batch, groups, group_channels, height, width
    ).permute(0, 1, 3, 4, 2)
    return buffer


def _carafe_window_row(buffer: torch.Tensor, row: int, kernel_size: int, positions: int) -> torch.Tensor:
    """Row ``row`` of every position's window: `(positions, k, C/G)`, a view of the stacked buffer."""
    cols, channels = buffer.shape[1], buffer.shape[2]
    return buffer.as_strided((positions, kernel_size, channels), (channels, channels, 1), row * cols * channels)


def _carafe_stack_kernels(kernels: torch.Tensor, groups: int, kernel_size: int, scale: int) -> torch.Tensor:
    """`(B, G·k², h·s, w·s)` -> `(k, positions, s², k)`: kernel row, position, sub-pixel, kernel column.

    Positions in the margins of the stacked layout get zero kernels.
    """
    batch, _, out_height, out_width = kernels.shape
    height, width, k = out_height // scale, out_width // scale, kernel_size
    rows, cols, positions = _carafe_layout(batch, groups, height, width, k // 2)
    buffer = kernels.new_zeros(k, batch, groups, rows, cols, scale, scale, k)
    buffer[:, :, :, :height, :width] = kernels.reshape(batch, groups, k, k, height, scale, width, scale).permute(
        2, 0, 1, 4, 6, 5, 7, 3
    )
    return buffer.view(k, positions, scale * scale, k)


def _carafe_by_taps(features: torch.Tensor, kernels: torch.Tensor, kernel_size: int, groups: int) -> torch.Tensor:
    """:func:`carafe` at scale 1 as k² multiply-adds of shifted views, ``out = Σ_t K_t ⊙ X_t``: `(B, C, H, W)`.

    At scale 1 each position has a single output, so the batched products of :class:`_Carafe` are matrix-vector
    products of one kernel row each; k² elementwise passes over NCHW maps are 4–6× faster on CPU (3×3 over
    64×128×128: 6.9 vs 27 ms, 2 threads) and leave the result contiguous.
    """
    batch, channels, height, width = features.shape
    padded = F.pad(features, [kernel_size // 2] * 4)
    padded = padded.view(batch, groups, channels // groups, *padded.shape[-2:])
    taps = kernels.view(batch, groups, kernel_size * kernel_size, 1, height, width).unbind(2)
    # Accumulated in at least float32, as convolution and matrix-product kernels accumulate: in bfloat16, rounding
    # each of the k² partial sums doubled the error (3×3 over 64×128×128, against float64 on the same rounded
    # inputs: mean 1.4e-3 vs 7.3e-4, max 0.033 vs 0.015).
    output = (padded[..., :height, :width] * taps[0]).to(torch.promote_types(features.dtype, torch.float32))
    for tap in range(1, kernel_size * kernel_size):
        row, col = divmod(tap, kernel_size)
        output.addcmul_(padded[..., row : row + height, col : col + width], taps[tap])
    return output.to(features.dtype).view(batch, channels, height, width)


def _carafe_by_windows(features: torch.Tensor, kernels: torch.Tensor, kernel_size: int, scale: int, groups: int):
    """:func:`carafe` at scale > 1 as one batched product ``K_p (s² × k²) · X_p (k² × C/G)``: `(B, C, H·s, W·s)`.

    The k×k window ``X_p`` of every position must be one matrix with a single row stride, so the zero-padded
    pixel-major map is stacked k times along its rows (``stack[q, i] = pixel q + i·row width``): the k² window
    rows, ordered (column, row), then sit at stride C/G from position p's entry, and the windows of successive
    positions are overlapping views (batch stride k·C/G). One product writes the result once, where k products
    over window rows read and re-wrote it k times (CPU, 2 threads, 233 channels of 64×64 → ×2, k = 5: 17 vs 21 ms;
    25 channels: 2.5 vs 4.7 ms, isolated). The whole OffSeg-T gains less (0.983× the time of the k-product form,
    interleaved A/B): inside the model the k stacking copies cost about 2 ms each at 233 channels. The channels of
    the pixel-major buffer are padded to a multiple of 16: aten's transposing copy into it is 2.7× slower for 233
    channels than for 240 (5.4 vs 2.0 ms).

    The result is a channels-last view per group (channels innermost), not an NCHW transpose of the whole map,
    which cost more than the product.
    """
    batch, channels, height, width = features.shape
    radius = kernel_size // 2
    rows, cols, positions = _carafe_layout(batch, groups, height, width, radius)
    pixels = _carafe_stack_features(features, groups, radius, channel_multiple=16)
    group_channels, padded_channels = channels // groups, pixels.shape[-1]
    pixels = pixels.view(-1, padded_channels)
    reach = positions + kernel_size - 1  # the windows of the last position end k − 1 pixels further right
    stack = features.new_empty(reach, kernel_size, padded_channels)
    for row in range(kernel_size):
        stack[:, row] = pixels[row * cols : row * cols + reach]
    windows = stack.as_strided(
        (positions, kernel_size * kernel_size, padded_channels), (kernel_size * padded_channels, padded_channels, 1)
    )
    taps = kernels.new_zeros(batch, groups, rows, cols, scale, scale, kernel_size, kernel_size)
    taps[:, :, :height, :width] = kernels.reshape(
        batch, groups, kernel_size, kernel_size, height, scale, width, scale
    ).permute(0, 1, 4, 6, 5, 7, 3, 2)  # position, sub-pixel, then the taps as (column, row)
    output = torch.bmm(taps.view(positions, scale * scale, -1), windows)  # (positions, s², padded C/G)
    output = output.view(batch, groups, rows, cols, scale, scale, -1)[:, :, :height, :width, :, :, :group_channels]
    output = output.permute(0, 1, 2, 4, 3, 5, 6).reshape(batch, groups, height * scale, width * scale, -1)
    return output.permute(0, 1, 4, 2, 3).reshape(batch, channels, height * scale, width * scale)


class _Carafe(torch.autograd.Function):
    """:func:`carafe` with its own backward. Forward: one batched product at scale > 1 (:func:`_carafe_by_windows`),
    k² multiply-adds at scale 1 (:func:`_carafe_by_taps`).

    At each low-res position p the ``s²`` outputs are ``K_p (s² × k²) · X_p (k² × C)`` with ``X_p`` the k×k
    neighbourhood. Gradients, one kernel row at a time as batched products over an overlapping strided view of
    the padded input (no k-fold copy of what autograd keeps): ``∂K_p = G_p · X_pᵀ`` and ``∂X_p = K_pᵀ · G_p``, the
    latter added back into the padded input at each tap's shift.

    Called through its :func:`~.precision.autocast_functions` twin (``torch.amp.custom_fwd`` / ``custom_bwd`` for the call's
    device type) with both inputs already in the dtype :func:`carafe` computes in, so that backward runs with the
    forward's autocast state and dtypes.
    """

    @staticmethod
    def forward(ctx, features, kernels, kernel_size, scale, groups):
        ctx.save_for_backward(features, kernels)
        ctx.kernel_size, ctx.scale, ctx.groups = kernel_size, scale, groups
        if scale == 1:
            return _carafe_by_taps(features, kernels, kernel_size, groups)
        return _carafe_by_windows(features, kernels, kernel_size, scale, groups)

    @staticmethod
    def backward(ctx, grad_output):
        features, kernels = ctx.saved_tensors  # both in the forward's dtype; autograd gives grad_output in it too
        k, scale, groups = ctx.kernel_size, ctx.scale, ctx.groups
        batch, channels, height, width = features.shape
        radius = k // 2
        rows, cols, positions = _carafe_layout(batch, groups, height, width, radius)
        grad = grad_output.new_zeros(batch, groups, rows, cols, scale, scale, channels // groups)
        grad[:, :, :height, :width] = grad_output.reshape(
            batch, groups, -1, height, scale, width, scale
        ).permute(0, 1, 3, 5, 4, 6, 2)
        grad = grad.view(positions, scale * scale, -1)
        stacked = _carafe_stack_features(features, groups, radius)
        grad_features = grad_kernels = None
        if ctx.needs_input_grad[1]:
            grad_taps = torch.stack(
                [grad @ _carafe_window_row(stacked, row, k, positions).transpose(1, 2) for row in range(k)]
            ).view(k, batch, groups, rows, cols, scale, scale, k)[:, :, :, :height, :width]
            grad_kernels = grad_taps.permute(1, 2, 0, 7, 3, 5, 4, 6).reshape(kernels.shape)
        if ctx.needs_input_grad[0]:
            taps = _carafe_stack_kernels(kernels, groups, k, scale)
            # The k² shifted window gradients are summed in at least float32 (see _carafe_by_taps).
            grad_stacked = torch.zeros_like(stacked, dtype=torch.promote_types(stacked.dtype, torch.float32))
            flat = grad_stacked.view(-1, stacked.shape[-1])
            for row in range(k):
                grad_window = taps[row].transpose(1, 2) @ grad  # (positions, k, C/G)
                for col in range(k):
                    start = row * cols + col
                    flat[start : start + positions] += grad_window[:, col]
            images = grad_stacked[: batch * groups * rows].view(batch, groups, rows, cols, -1)
            grad_features = images[:, :, radius : radius + height, radius : radius + width].permute(0, 1, 4, 2, 3)
            grad_features = grad_features.reshape(features.shape).to(features.dtype)
        return grad_features, grad_kernels, None, None, None


_CARAFE = autocast_functions(_Carafe)


def carafe(features: torch.Tensor, kernels: torch.Tensor, kernel_size: int, scale: int = 1, groups: int = 1):
    """Content-aware reassembly (CARAFE, Wang et al. 2019) with given, already normalised kernels.

    ``out[n, c, y, x] = Σ_{i,j<k} kernels[n, g·k² + i·k + j, y, x] · features[n, c, ⌊y/s⌋ + i − r, ⌊x/s⌋ + j − r]``
    with ``r = (k − 1) / 2``, zero outside the input and ``g`` the channel group of ``c``.

    Args:
        features: `(B, C, H, W)`.
        kernels: `(B, groups·k², H·scale, W·scale)`.
        kernel_size: k (odd).
        scale: upsampling factor s.
        groups: channel groups sharing one kernel.

    Returns:
        `(B, C, H·scale, W·scale)`.
    """
    batch, channels, height, width = features.shape
    taps = kernel_size * kernel_size
    if kernels.shape != (batch, groups * taps, height * scale, width * scale):
        raise ValueError(
            f"carafe: kernels of shape {tuple(kernels.shape)} do not fit features {tuple(features.shape)} "
            f"with kernel_size={kernel_size}, scale={scale}, groups={groups}"
        )
    # A matrix product of kernels and windows: in autocast's dtype under autocast (as conv2d / matmul run there),
    # otherwise in the inputs' promoted dtype; the casts are no-ops when the inputs are in it already.
    dtype = compute_dtype(features, kernels)
    features, kernels = features.to(dtype), kernels.to(dtype)
    if torch.compiler.is_exporting():
        return carafe_by_gather(features, kernels, kernel_size, scale, groups)
    return _CARAFE.get(features.device.type, _Carafe).apply(features, kernels, kernel_size, scale, groups)


def carafe_by_gather(features: torch.Tensor, kernels: torch.Tensor, kernel_size: int, scale: int = 1, groups: int = 1):
    """:func:`carafe` as one row gather of every k×k window and one broadcast matrix product (the exported form).

    ``out[(y, a, x, b)] = K[(y, a, x, b)] (1 × k²) · X_(y, x) (k² × C/G)`` for sub-pixel (a, b) of low-res position
    (y, x), with the windows ``X_(y, x)`` gathered as whole pixel rows of the padded, pixel-major input. Same
    arguments and result as :func:`carafe`, no backward of its own.

    ``torch.export`` (and so ONNX) takes this form: the strided window views of :class:`_Carafe` become an
    element-wise index gather there. ONNX Runtime, 2 CPU threads, 224×64×64 → ×2, k = 5: 163 ms as strided
    views, 22 ms this way (PyTorch eager runs the opposite way round: 20 ms as views, 110 ms this way, because it
    materialises the k² windows).
    """
    batch, channels, height, width = features.shape
    images, taps, radius = batch * groups, kernel_size * kernel_size, kernel_size // 2
    rows, cols, _ = _carafe_layout(batch, groups, height, width, radius)
    padded = F.pad(features, [radius] * 4).reshape(images, channels // groups, rows * cols)
    pixels = padded.transpose(1, 2).reshape(images * rows * cols, channels // groups)
    device = features.device
    corners = (
        torch.arange(images, device=device).view(images, 1, 1) * (rows * cols)
        + torch.arange(height, device=device).view(1, height, 1) * cols
        + torch.arange(width, device=device).view(1, 1, width)
    )  # (images, h, w): top-left pixel of each window in the padded rows
    window = torch.arange(kernel_size, device=device)
    offsets = (window.view(-1, 1) * cols + window.view(1, -1)).view(1, 1, 1, taps)
    windows = pixels.index_select(0, (corners.unsqueeze(-1) + offsets).reshape(-1))
    windows = windows.view(images, height, 1, width, taps, channels // groups)
    weights = kernels.reshape(images, taps, -1).transpose(1, 2)
    weights = weights.reshape(images, height, scale, width, scale, taps)
    output = weights @ windows  # (images, h, s, w, s, C/G): rows in output pixel order
    output = output.reshape(batch, groups, height * scale * width * scale, channels // groups)
    return output.permute(0, 1, 3, 2).reshape(batch, channels, height * scale, width * scale)


def normalize_kernels(kernel_logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the k² taps of each pixel's filter: `(B, k², H, W) -> (B, k², H, W)`, rows sum to 1."""
    if torch.compiler.is_exporting():
        # Spelled out for ONNX: ONNX Runtime's Softmax over a non-last axis transposes there and back.
        exponentials = (kernel_logits - kernel_logits.amax(dim=1, keepdim=True)).exp()
        return exponentials / exponentials.sum(dim=1, keepdim=True)
    return kernel_logits.softmax(dim=1)


def neighbour_cosine_similarity(features: torch.Tensor, dilation: int = 2) -> torch.Tensor:
    """Cosine similarity of each pixel with its 8 neighbours in a 3×3 window of the given dilation.

    Neighbours outside the image count as zero vectors (similarity 0). A pair of opposite neighbours shares one
    channel reduction: ``⟨f(p), f(p + d)⟩`` at p is the product computed for ``p + d`` towards ``−d``, so four
    products of shifted views of the zero-padded map give all eight dot products (the same values as eight).

    Args:
        features: `(B, C, H, W)`.

    Returns:
        `(B, 8, H, W)`, neighbours in row-major order with the centre left out, in the features' dtype. The
        ``1e-8`` guard of ``0 / 0`` at the image border rounds to zero in float16, whose guard is therefore its
        smallest normal number (6.1e-5; the reference's float32 value otherwise).
    """
    tiny = torch.finfo(features.dtype).tiny
    guard = max(1e-8, tiny)
    height, width = features.shape[-2:]
    padded = F.pad(features, [dilation] * 4)
    rows, cols = padded.shape[-2:]
    dots = {}
    for dy, dx in _NEIGHBOURS[4:]:  # right, lower left, below, lower right; the first four are their opposites
        dy, dx = dy * dilation, dx * dilation
        first = max(0, -dx)  # first padded column whose product is computed
        products = (
            padded[..., : rows - dy, first : cols - max(0, dx)] * padded[..., dy:, first + dx : cols + min(0, dx)]
        ).sum(dim=1)  # at padded (u, v): ⟨f(u, v), f(u + dy, v + dx)⟩
        at = dilation - first
        dots[dy, dx] = products[:, dilation : dilation + height, at : at + width]
        dots[-dy, -dx] = products[:, dilation - dy : dilation - dy + height, at - dx : at - dx + width]
    dots = torch.stack([dots[dy * dilation, dx * dilation] for dy, dx in _NEIGHBOURS], dim=1)
    # ‖f‖ as the root of the channel sum of squares (floored so that its gradient is finite at a zero vector,
    # where the 1e-8 guard of the product applies anyway); linalg.vector_norm is 10× slower over dim 1 on CPU.
    norms = features.square().sum(dim=1, keepdim=True).clamp_min(max(1e-30, tiny)).sqrt()
    return dots / (norms * _dilated_neighbours(norms, dilation)[:, 0]).clamp_min(guard)


# The 8 neighbours of the 3×3 window in row-major order, centre left out: (row, column) offsets in units of dilation.
_NEIGHBOURS = [(row - 1, col - 1) for row in range(3) for col in range(3) if (row, col) != (1, 1)]


def _dilated_neighbours(features: torch.Tensor, dilation: int) -> torch.Tensor:
    """The 8 neighbours of every pixel in a dilated 3×3 window, zero outside: `(B, C, H, W) -> (B, C, 8, H, W)`."""
    height, width = features.shape[-2:]
    padded = F.pad(features, [dilation] * 4)
    return torch.stack(
        [
            padded[:, :, (1 + dy) * dilation : (1 + dy) * dilation + height, (1 + dx) * dilation : (1 + dx) * dilation + width]
            for dy, dx in _NEIGHBOURS
        ],
        dim=2,
    )


class OffSegProjectionConv(PointwiseConv2d):
    """1×1 convolution without bias of the decoder's conv blocks (Kaiming-normal init, fan_out, ReLU)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, bias=False)


class OffSegKernelEncoder(nn.Conv2d):
    """FreqFusion's filter generator: predicts a k×k CARAFE kernel per pixel, `(B, C, H, W) -> (B, k², H, W)`.

    Initialised N(0, 0.001) (bias 0), so that the first kernels are nearly uniform.
    """

    def __init__(self, in_channels: int, kernel_size: int, encoder_kernel: int):
        super().__init__(in_channels, kernel_size**2, encoder_kernel, padding=encoder_kernel // 2)


class OffSegConvNormAct(nn.Module):
    """1×1 convolution (no bias) → GroupNorm → ReLU: `(B, C_in, H, W) -> (B, C_out, H, W)`."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int):
        super().__init__()
        self.conv = OffSegProjectionConv(in_channels, out_channels)
        self.norm = nn.GroupNorm(num_groups, out_channels, eps=1e-5)
        self.act = nn.ReLU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(hidden_states)))


class OffSegSimilaritySampler(nn.Module):
    """FreqFusion's offset generator: resamples an upsampled map along offsets predicted from local similarity.

    From the compressed high-res feature (B, C, 2h, 2w) and low-res feature (B, C, h, w) it predicts, for each
    of ``groups`` channel groups and each of the 2×2 sub-pixels of a low-res pixel, a sampling point
    ``centre + init_pos + offset · sigmoid(scale)``; the offsets come from the cosine similarity of every
    pixel with its 8 dilated neighbours (after GroupNorm), the scales from the normalised features.
    """

    def __init__(self, in_channels: int, groups: int, kernel_size: int):
        super().__init__()
        self.groups = groups
        self.scale = 2
        padding = kernel_size // 2
        subpixel_channels = 2 * groups * self.scale**2
        self.offset = nn.Conv2d(8, subpixel_channels, kernel_size, padding=padding)
        self.direct_scale = nn.Conv2d(in_channels, subpixel_channels, kernel_size, padding=padding)
        self.hr_offset = nn.Conv2d(8, 2 * groups, kernel_size, padding=padding)
        self.hr_direct_scale = nn.Conv2d(in_channels, 2 * groups, kernel_size, padding=padding)
        self.norm_hr = nn.GroupNorm(in_channels // 8, in_channels)
        self.norm_lr = nn.GroupNorm(in_channels // 8, in_channels)

    def initial_positions(self, device, dtype) -> torch.Tensor:
        """Sub-pixel centres relative to the low-res pixel centre, `(1, 2·groups·4, 1, 1)`.

        Channel ``xy·4G + g·4 + i·2 + j``: x = ±0.25 by sub-pixel column j, y = ±0.25 by sub-pixel row i.
        """
        half = torch.tensor([-0.25, 0.25], device=device, dtype=dtype)
        x = half.view(1, 2).expand(2, 2)
        y = half.view(2, 1).expand(2, 2)
        return torch.stack([x, y]).reshape(2, 1, 4).expand(2, self.groups, 4).reshape(1, -1, 1, 1)

    def forward(self, hr_features: torch.Tensor, lr_features: torch.Tensor, to_sample: torch.Tensor):
        """
        Args:
            hr_features: compressed high-res feature `(B, C, 2h, 2w)`.
            lr_features: compressed low-res feature `(B, C, h, w)`.
            to_sample: the upsampled map to resample, `(B, C_s, 2h, 2w)`, C_s divisible by ``groups``.

        Returns:
            `(B, C_s, 2h, 2w)`.
        """
        hr_features = self.norm_hr(hr_features)
        lr_features = self.norm_lr(lr_features)
        hr_similarity = neighbour_cosine_similarity(hr_features)
        lr_similarity = neighbour_cosine_similarity(lr_features)
        offset = self.offset(lr_similarity) + F.pixel_unshuffle(self.hr_offset(hr_similarity), self.scale)
        gate = self.direct_scale(lr_features) + F.pixel_unshuffle(self.hr_direct_scale(hr_features), self.scale)
        return self.sample(to_sample, offset * gate.sigmoid())

    def sample(self, features: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Bilinear sampling (border padding) of `features (B, C, 2h, 2w)` at low-res pixel centres + initial
        sub-pixel positions + `offset`, returned in the features' dtype.

        `offset`: `(B, 2·groups·4, h, w)` in low-res pixel units, layout ``[xy][group][sub-pixel]``.

        Precision: the grid and the sampling run in at least float32, whatever the features' dtype. A position is a
        pixel centre (up to the map's width) plus a sub-pixel offset, and bfloat16 resolves 0.5 px between 64 and
        128: computed in bfloat16, the grid of a 128×128 map moved the sampling points by up to 0.5 px
        (``.to(bfloat16)`` OffSeg-T used to run so); a bfloat16 grid normalised to [-1, 1] is still off by up to
        0.25 px at that width. ``grid_sample`` takes one dtype for both, so the features are cast for it.
        """
        batch, _, height, width = offset.shape
        dtype = torch.promote_types(offset.dtype, torch.float32)
        offset = offset.to(dtype) + self.initial_positions(offset.device, dtype)
        offset = offset.reshape(batch, 2, -1, height, width)
        ys = torch.arange(height, device=offset.device, dtype=dtype) + 0.5
        xs = torch.arange(width, device=offset.device, dtype=dtype) + 0.5
        centres = torch.stack([xs.view(1, width).expand(height, width), ys.view(height, 1).expand(height, width)])
        size = torch.tensor([width, height], device=offset.device, dtype=dtype).view(1, 2, 1, 1, 1)
        grid = 2 * (centres.view(1, 2, 1, height, width) + offset) / size - 1
        grid = F.pixel_shuffle(grid.reshape(batch, -1, height, width), self.scale)
        grid = grid.reshape(batch, 2, self.groups, self.scale * height, self.scale * width)
        grid = grid.permute(0, 2, 3, 4, 1).flatten(0, 1)
        grouped = features.reshape(batch * self.groups, -1, features.shape[-2], features.shape[-1]).to(dtype)
        if torch.compiler.is_exporting():
            sampled = grid_sample_by_gather(grouped, grid)
        else:
            sampled = F.grid_sample(grouped, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return sampled.reshape(batch, -1, self.scale * height, self.scale * width).to(features.dtype)


def grid_sample_by_gather(features: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)`` as four
    pixel-row gathers (the exported form of :meth:`OffSegSimilaritySampler.sample`).

    Args:
        features: `(N, C, H, W)`.
        grid: `(N, H_out, W_out, 2)`, (x, y) in [-1, 1] at the outer pixel edges; points outside are clamped to
            the border pixels.

    Returns:
        `(N, C, H_out, W_out)`.

    ONNX Runtime's GridSample interpolates pixel by pixel and channel by channel (2 CPU threads, 4 groups of
    56×128×128: 85 ms); here the four corner weights are computed once per point and whole channel rows are
    gathered (the same function up to float rounding).
    """
    images, channels, height, width = features.shape
    out_height, out_width = grid.shape[1:3]
    # Source coordinates in pixels (align_corners=False), clamped to the image ("border" padding).
    x = (((grid[..., 0] + 1) * width - 1) / 2).clamp(0, width - 1).reshape(images, -1, 1)
    y = (((grid[..., 1] + 1) * height - 1) / 2).clamp(0, height - 1).reshape(images, -1, 1)
    x0, y0 = x.floor(), y.floor()
    wx, wy = x - x0, y - y0
    x0, y0 = x0.long(), y0.long()
    x1 = torch.clamp(x0 + 1, max=width - 1)
    y1 = torch.clamp(y0 + 1, max=height - 1)
    pixels = features.reshape(images, channels, height * width).transpose(1, 2).reshape(-1, channels)
    first = torch.arange(images, device=features.device).view(images, 1, 1) * (height * width)

    def corner(rows, cols):
        return pixels.index_select(0, (first + rows * width + cols).reshape(-1)).view(images, -1, channels)

    sampled = corner(y0, x0) * ((1 - wx) * (1 - wy)) + corner(y0, x1) * (wx * (1 - wy))
    sampled = sampled + corner(y1, x0) * ((1 - wx) * wy) + corner(y1, x1) * (wx * wy)
    return sampled.transpose(1, 2).reshape(images, channels, out_height, out_width)


class OffSegFreqFusion(nn.Module):
    """FreqFusion (Chen et al., TPAMI 2024): fuses a stride-2s feature into a stride-s one.

    * AHPF (``highpass_encoder``): per-pixel 3×3 kernels; ``x + (x − lowpass(x))`` sharpens the high-res map.
    * ALPF (``lowpass_encoder``): per-pixel 5×5 kernels predicted from both resolutions upsample the low-res
      map by CARAFE (smooth, content-aware ×2 upsampling).
    * ``resampler`` (:class:`OffSegSimilaritySampler`) refines the upsampled map by resampling it.

    Inputs ``hr (B, C_hr, 2h, 2w)``, ``lr (B, C_lr, h, w)``; outputs the sharpened ``hr (B, C_hr, 2h, 2w)`` and
    upsampled ``lr (B, C_lr, 2h, 2w)``.
    """

    def __init__(self, config: OffSegConfig, hr_channels: int, lr_channels: int):
        super().__init__()
        compressed = (hr_channels + lr_channels) // 4
        self.lowpass_kernel = config.freqfusion_lowpass_kernel
        self.highpass_kernel = config.freqfusion_highpass_kernel
        encoder_kernel = config.freqfusion_encoder_kernel
        self.hr_channel_compressor = PointwiseConv2d(hr_channels, compressed)
        self.lr_channel_compressor = PointwiseConv2d(lr_channels, compressed)
        self.lowpass_encoder = OffSegKernelEncoder(compressed, self.lowpass_kernel, encoder_kernel)
        self.highpass_encoder = OffSegKernelEncoder(compressed, self.highpass_kernel, encoder_kernel)
        self.resampler = OffSegSimilaritySampler(
            compressed, config.freqfusion_resample_groups, config.freqfusion_sampler_kernel
        )

    def forward(self, hr_features: torch.Tensor, lr_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low_k, high_k = self.lowpass_kernel, self.highpass_kernel
        if hr_features.shape[-2:] != tuple(2 * size for size in lr_features.shape[-2:]):
            raise ValueError(
                f"FreqFusion needs the high-res map to be exactly twice the low-res one, got "
                f"{tuple(hr_features.shape[-2:])} and {tuple(lr_features.shape[-2:])}"
            )
        hr_compressed = self.hr_channel_compressor(hr_features)
        lr_compressed = self.lr_channel_compressor(lr_features)

        # AHPF on the compressed high-res map: x + (x - lowpass(x)).
        highpass_from_hr = self.highpass_encoder(hr_compressed)
        hr_compressed = 2 * hr_compressed - carafe(hr_compressed, normalize_kernels(highpass_from_hr), high_k)

        # ALPF kernels from both resolutions; the low-res part is upsampled by CARAFE with the high-res kernels.
        lowpass_from_hr = self.lowpass_encoder(hr_compressed)
        lowpass_kernels = lowpass_from_hr + carafe(
            self.lowpass_encoder(lr_compressed), normalize_kernels(lowpass_from_hr), low_k, scale=2
        )
        lowpass_kernels = normalize_kernels(lowpass_kernels)
        # The low-res high-pass kernels and the low-res feature are upsampled by the same ALPF kernels: one CARAFE.
        dtype = compute_dtype(lr_features, lowpass_kernels)  # carafe's: concatenated in it, not cast after
        highpass_from_lr = self.highpass_encoder(lr_compressed).to(dtype)
        upsampled = carafe(torch.cat([highpass_from_lr, lr_features.to(dtype)], dim=1), lowpass_kernels, low_k, scale=2)
        highpass_kernels = highpass_from_hr + upsampled[:, : high_k * high_k]
        lr_upsampled = upsampled[:, high_k * high_k :]
        hr_features = 2 * hr_features - carafe(hr_features, normalize_kernels(highpass_kernels), high_k)
        lr_upsampled = self.resampler(hr_compressed, lr_compressed, lr_upsampled)
        return hr_features, lr_upsampled


def interleave_channels(first: torch.Tensor, second: torch.Tensor, chunks: int) -> torch.Tensor:
    """Concatenate two maps in ``chunks`` interleaved channel blocks.

    `(B, C1, H, W), (B, C2, H, W) -> (B, C1 + C2, H, W)` ordered ``[a0, b0, a1, b1, …]`` where ``a_i``/``b_i``
    are the i-th of ``chunks`` equal channel blocks of each input (this is how the reference concatenates, with
    ``chunks`` = FreqFusion's resampling groups, so that the groups stay aligned with channel blocks).
    """
    batch, _, height, width = first.shape
    return torch.cat(
        [first.reshape(batch * chunks, -1, height, width), second.reshape(batch * chunks, -1, height, width)], dim=1
    ).reshape(batch, -1, height, width)


class OffSegDecoder(nn.Module):
    """Decoder up to the aligned feature E.

    `[(B, C_i, H/2^(i+2), W/2^(i+2)) for i in 0..3] -> (B, decoder_hidden_size, H/4, W/4)`: per-stage 1×1 conv +
    GN + ReLU, three FreqFusion fusions from stride 32 to stride 4 (each followed by an interleaved concat,
    so channels grow to ``sum(decoder_stage_channels)``), then the align 1×1 conv + GN + ReLU.
    """

    def __init__(self, config: OffSegConfig, in_channels: list[int]):
        super().__init__()
        stage_channels = config.decoder_stage_channels
        self.chunks = config.freqfusion_resample_groups
        self.stage_projections = nn.ModuleList(
            OffSegConvNormAct(cin, cout, config.decoder_num_groups) for cin, cout in zip(in_channels, stage_channels)
        )
        fusions = []
        lr_channels = stage_channels[-1]
        for hr_channels in reversed(stage_channels[:-1]):
            fusions.append(OffSegFreqFusion(config, hr_channels, lr_channels))
            lr_channels += hr_channels
        self.fusions = nn.ModuleList(fusions)
        self.align = OffSegConvNormAct(lr_channels, config.decoder_hidden_size, config.decoder_num_groups)

    def fuse(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The FreqFusion cascade: `(B, sum(decoder_stage_channels), H/4, W/4)`, input of ``align``."""
        projected = [projection(feature) for projection, feature in zip(self.stage_projections, features)]
        fused = projected[-1]
        for fusion, hr_features in zip(self.fusions, reversed(projected[:-1])):
            hr_features, lr_upsampled = fusion(hr_features, fused)
            fused = interleave_channels(hr_features, lr_upsampled, self.chunks)
        return fused

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.align(self.fuse(features))


class OffSegPerPixelClassifier(nn.Conv2d):
    """The per-pixel classifier ``M = W·Eᵀ`` (paper Eq. 1; Table 6's baseline): a 1×1 convolution with bias,
    `(B, C, H, W) -> (B, K, H, W)`, initialised N(0, 0.01) as the reference ``conv_seg``."""

    def __init__(self, hidden_size: int, num_labels: int):
        super().__init__(hidden_size, num_labels, 1)


class OffSegPreTrainedModel(PreTrainedModel):
    config: OffSegConfig
    config_class = OffSegConfig
    base_model_prefix = "offseg"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["EfficientFormerV2Stage", "OffSegFreqFusion"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True

    @torch.no_grad()
    def _init_weights(self, module):
        """Reference init of the decoder and classifier (the backbone initialises itself):

        * 1×1 conv blocks (:class:`OffSegProjectionConv`): Kaiming normal (fan_out, ReLU), GroupNorm (1, 0);
        * FreqFusion: N(0, 0.001) for both filter generators (:class:`OffSegKernelEncoder`), Xavier-uniform
          (bias 0) for its other convolutions — every plain ``nn.Conv2d`` of the decoder;
        * offset learning: truncated normal (std ``offset_learning_init_std``) for W and both projections,
          LayerNorm (1, 0); per-pixel classifier: N(0, 0.01), bias 0.
        """
        if isinstance(module, OffSegProjectionConv):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, OffSegKernelEncoder):
            init.normal_(module.weight, std=0.001)
            init.zeros_(module.bias)
        elif isinstance(module, OffSegPerPixelClassifier):
            init.normal_(module.weight, std=0.01)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            init.xavier_uniform_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, OffsetLearning):
            std = self.config.offset_learning_init_std
            init.trunc_normal_(module.class_embeddings, std=std)
            init.trunc_normal_(module.class_offset_proj.weight, std=std)
            init.trunc_normal_(module.feature_offset_proj.weight, std=std)


def pad_to_multiple(pixel_values: torch.Tensor, multiple: int = INPUT_MULTIPLE) -> torch.Tensor:
    """Zero-pad `(B, C, H, W)` at the bottom/right so that H and W are multiples of ``multiple``.

    Written for tracing with symbolic sizes (``torch.export`` / ONNX with dynamic H, W): exported, there is no
    branch on the size (a pad of 0 is a copy), and only floor divisions of non-negative numbers, which every
    runtime rounds alike (ONNX's integer ``Div`` truncates towards zero, so ``(-H) % m`` or ``-(-H // m)`` would
    round wrongly there). Run eagerly or compiled, an input that needs no padding is returned as it is.
    """
    height, width = pixel_values.shape[-2:]
    pad_h = (height + multiple - 1) // multiple * multiple - height
    pad_w = (width + multiple - 1) // multiple * multiple - width
    if not torch.compiler.is_exporting() and pad_h == 0 and pad_w == 0:
        return pixel_values
    return F.pad(pixel_values, (0, pad_w, 0, pad_h))


def crop_padding(features: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The top-left `(B, C, height, width)` of `(B, C, H', W')`: the padding of :func:`pad_to_multiple` cut off.

    A view, except under ``torch.export``, where it is a negative pad: a slice would make the exported graph
    specialise on whether it crops anything (through the contiguity of the result).
    """
    if torch.compiler.is_exporting():
        return F.pad(features, (0, width - features.shape[-1], 0, height - features.shape[-2]))
    return features[..., :height, :width]


class OffSegModel(OffSegPreTrainedModel):
    """Backbone + decoder without the classifier.

    `pixel_values (B, 3, H, W)` (any H, W) → ``last_hidden_state``: the aligned feature E,
    `(B, decoder_hidden_size, ⌈H/4⌉, ⌈W/4⌉)`; ``hidden_states`` / ``attentions`` (on request): those of the
    backbone (for EfficientFormerV2: stem and the four stage outputs, computed on the input padded to a multiple
    of 32; the weights of every attention block).

    The backbone is EfficientFormerV2 (the paper) or any Transformers backbone (``load_backbone``) whose four
    feature maps have strides 4, 8, 16 and 32.
    """

    def __init__(self, config: OffSegConfig):
        super().__init__(config)
        # EfficientFormerV2 is built directly: a saved folder then also loads as remote code, where nothing
        # registers it with AutoBackbone (and where its config class may come from another dynamic module).
        if config.backbone_config.model_type == EfficientFormerV2Config.model_type:
            self.backbone = EfficientFormerV2Backbone(config.backbone_config)
        else:
            self.backbone = load_backbone(config)
        self.decoder = OffSegDecoder(config, list(self.backbone.channels))
        self.post_init()

    @can_return_tuple
    def forward(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> BaseModelOutput:
        r"""
        pixel_values (`torch.Tensor` of shape `(B, 3, H, W)`): normalised images of any size.

        Returns `BaseModelOutput` with the aligned feature E as `last_hidden_state`, `(B, C, ⌈H/4⌉, ⌈W/4⌉)`.
        """
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (batch, channels, height, width), got shape {tuple(pixel_values.shape)}")
        expected_channels = self.backbone.config.num_channels
        if pixel_values.shape[1] != expected_channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels, the model expects {expected_channels} "
                f"(shape {tuple(pixel_values.shape)})"
            )
        height, width = pixel_values.shape[-2:]
        for flag in ("output_hidden_states", "output_attentions"):  # this config's defaults, not the backbone's
            if kwargs.get(flag) is None:
                kwargs[flag] = getattr(self.config, flag, False)
        backbone_outputs = self.backbone(pad_to_multiple(pixel_values), return_dict=True, **kwargs)
        features = self.decoder(list(backbone_outputs.feature_maps))
        features = crop_padding(features, (height + 3) // 4, (width + 3) // 4)  # ⌈H/4⌉ × ⌈W/4⌉
        return BaseModelOutput(
            last_hidden_state=features,
            hidden_states=backbone_outputs.hidden_states,
            attentions=backbone_outputs.attentions,
        )


class OffSegForSemanticSegmentation(OffSegPreTrainedModel):
    """OffSeg for semantic segmentation: `pixel_values (B, 3, H, W)` → logits `(B, K, ⌈H/4⌉, ⌈W/4⌉)`.

    Any input size works: the input is zero-padded to a multiple of 32 and the features are cropped back
    before the classifier (offset learning, or the per-pixel baseline with ``classifier="per_pixel"``). With
    ``labels (B, H_l, W_l)`` the loss is the cross-entropy of the logits bilinearly upsampled to the label size,
    ignoring ``config.semantic_loss_ignore_index``.

    Example:

    ```python
    >>> from offseg_hf import OffSegConfig, OffSegForSemanticSegmentation
    >>> model = OffSegForSemanticSegmentation(OffSegConfig.from_preset("offseg-t", num_labels=150)).eval()
    >>> model(torch.randn(1, 3, 97, 131)).logits.shape
    torch.Size([1, 150, 25, 33])
    ```
    """

    def __init__(self, config: OffSegConfig):
        check_num_labels(config.num_labels, "OffSeg")  # the config's own check, for a config changed after it was built
        super().__init__(config)
        self.offseg = OffSegModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        if config.classifier == "offset_learning":
            self.offset_learning = OffsetLearning(config.decoder_hidden_size, config.num_labels)
        else:
            self.classifier = OffSegPerPixelClassifier(config.decoder_hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SemanticSegmenterOutput:
        r"""
        pixel_values (`torch.Tensor` of shape `(B, 3, H, W)`): normalised images of any size.
        labels (`torch.LongTensor` of shape `(B, H_l, W_l)`, *optional*): class indices; pixels equal to
            `config.semantic_loss_ignore_index` are ignored. Label values are validated where the data enter
            (datasets, collator), not here, so that the loss needs no device synchronisation.

        Returns `SemanticSegmenterOutput` with `logits (B, K, ⌈H/4⌉, ⌈W/4⌉)` (+ `loss`, and the backbone's
        `hidden_states` / `attentions` when requested).
        """
        outputs = self.offseg(pixel_values, **kwargs)
        features = self.dropout(outputs.last_hidden_state)
        head = self.offset_learning if self.config.classifier == "offset_learning" else self.classifier
        logits = head(features)
        loss = None
        if labels is not None:
            loss = semantic_segmentation_loss(logits, labels, self.config.semantic_loss_ignore_index)
        return SemanticSegmenterOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


# save_pretrained writes an ``auto_map`` and copies these files, so a saved folder also loads with
# ``trust_remote_code=True`` where offseg_hf is not installed. The Auto* registrations live in the package.
OffSegModel.register_for_auto_class("AutoModel")
OffSegForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")

__all__ = [
    "OffSegDecoder",
    "OffSegForSemanticSegmentation",
    "OffSegFreqFusion",
    "OffSegKernelEncoder",
    "OffSegModel",
    "OffSegPerPixelClassifier",
    "OffSegPreTrainedModel",
    "OffSegProjectionConv",
    "OffSegSimilaritySampler",
    "carafe",
    "interleave_channels",
    "neighbour_cosine_similarity",
]
