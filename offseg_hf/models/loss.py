"""The semantic-segmentation loss shared by every model of this package (SegFormer's loss).

The function is SegFormer's: the cross-entropy of the logits bilinearly upsampled to the label size,
``F.cross_entropy(F.interpolate(logits, size, mode="bilinear", align_corners=False), labels, ignore_index=…)``.
It is computed by :class:`_UpsampledCrossEntropy`, which holds ONE full-resolution tensor (instead of the three
that the composition of ``interpolate``, ``log_softmax`` and ``nll_loss`` holds at the start of the backward pass)
and works in the pixel-major layout `(B, H, W, K)`, where the reductions over the K classes of a pixel run over
contiguous memory.

Kept free of device synchronisation: labels are validated where the data enter (datasets, collator,
processor), not here at every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .precision import autocast_functions


class _UpsampledCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of bilinearly upsampled logits over the pixels whose label is not ``ignore_index``.

    Forward (per pixel p of the upsampled logits x_p `(K,)` with label y_p):
    ``loss = Σ_p valid_p · (m_p + log Σ_k e_pk − x_p,y_p) / Σ_p valid_p`` with ``m_p = max_k x_pk`` and
    ``e_pk = exp(x_pk − m_p)``. Only ``e`` `(B, H, W, K)` is saved (written over the upsampled logits).

    Backward: ``∂loss/∂x_pk = g · valid_p · (e_pk / Σ_k e_pk − [k = y_p]) / Σ_p valid_p``, computed in place
    in ``e``, then taken back to the logits' resolution by the adjoint of the bilinear upsampling.

    Precision: computed in at least float32 whatever the logits' dtype, as ``F.cross_entropy`` runs under autocast;
    half-precision logits are cast at their own (stride-4) resolution, so the one full-resolution buffer is the
    only float32 copy (SegFormer's loss upsamples in half precision, then autocast casts that full-resolution map
    to float32 for ``cross_entropy``). The gradient returns in the logits' dtype. Called through its
    :func:`~.precision.autocast_functions` twin (``custom_fwd`` / ``custom_bwd``).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        size = tuple(labels.shape[-2:])
        logits_cl = logits.to(torch.promote_types(logits.dtype, torch.float32)).contiguous(memory_format=torch.channels_last)
        upsampled = F.interpolate(logits_cl, size=size, mode="bilinear", align_corners=False)
        pixels = upsampled.permute(0, 2, 3, 1)  # (B, H, W, K), contiguous: upsampling keeps channels-last
        valid = labels != ignore_index
        targets = torch.where(valid, labels, 0).unsqueeze(-1)  # (B, H, W, 1)
        picked = pixels.gather(-1, targets).squeeze(-1)  # x_p,y_p
        maxima = pixels.amax(dim=-1, keepdim=True)  # m_p
        exponentials = pixels.sub_(maxima).exp_()  # e_pk, in the upsampled buffer
        sums = exponentials.sum(dim=-1)
        per_pixel = maxima.squeeze(-1) + sums.log() - picked
        count = valid.sum()
        loss = torch.where(valid, per_pixel, 0).sum() / count
        ctx.save_for_backward(exponentials, sums, targets, valid, count)
        ctx.logits_shape, ctx.logits_dtype = tuple(logits.shape), logits.dtype
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        exponentials, sums, targets, valid, count = ctx.saved_tensors
        scale = grad_loss / count.clamp(min=1)  # no pixel counts: zero gradient, as F.cross_entropy gives
        weights = (valid * scale / sums).unsqueeze(-1)  # (B, H, W, 1)
        grad = exponentials.mul_(weights)  # softmax · weight, in place
        grad.scatter_add_(-1, targets, valid.unsqueeze(-1) * -scale)  # − [k = y_p] · weight
        height, width = grad.shape[1:3]
        grad_logits = torch.ops.aten.upsample_bilinear2d_backward(
            grad.permute(0, 3, 1, 2), [height, width], list(ctx.logits_shape), False, None, None
        )
        return grad_logits.to(ctx.logits_dtype), None, None


_LOSS = autocast_functions(_UpsampledCrossEntropy)


def semantic_segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Cross-entropy of `logits (B, K, h, w)` bilinearly upsampled to `labels (B, H, W)`.

    Pixels equal to ``ignore_index`` do not count (the mean is over the other pixels; NaN when there are none,
    as in ``F.cross_entropy``). Half-precision logits are computed in float32.
    """
    if labels.ndim != 3 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must be (batch, height, width) with batch {logits.shape[0]}, got shape {tuple(labels.shape)}"
        )
    return _LOSS.get(logits.device.type, _UpsampledCrossEntropy).apply(logits, labels.long(), ignore_index)


__all__ = ["semantic_segmentation_loss"]
