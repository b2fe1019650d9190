"""The precision policy of every model in this package, and the two helpers that implement it.

**Every operation runs in the dtype that autocast or the weights give it.** Under ``torch.autocast`` the
package's own matrix-product-like operations (the 1×1 convolutions run as batched products, CARAFE, the
EfficientFormerV2 bilinear upsampling) run in autocast's dtype, as autocast runs ``conv2d`` and ``matmul``; the
per-channel parameters that multiply activations (layer scales, the relative-position biases, offset learning's
class embeddings) follow the activation's dtype, so that a bfloat16 stream is not promoted back to float32 by
one float32 factor. Models cast with ``.to(torch.bfloat16)`` run in bfloat16 throughout, with no cast at all
except the exceptions below.

The exceptions, whose numerics need float32 (each is implemented, and its measurement given, where it lives):

* **the sampling grid** of OffSeg's similarity sampler (``OffSegSimilaritySampler.sample``): pixel centres up
  to the map's width plus sub-pixel offsets need float32's 24-bit mantissa (bfloat16 resolves 0.5 px at 64–128
  px), so the grid and ``grid_sample`` run in float32 and the sampled map goes back to the features' dtype;
* **float16 only, the ``0 / 0`` guard** of the neighbour cosine similarity: its floor is the smallest normal
  float16 (6.1e-5) instead of 1e-8, which float16 rounds to zero;
* **the loss** (:mod:`.loss`): float32, as ``F.cross_entropy`` runs under autocast.

Custom autograd Functions follow PyTorch's custom-function autocast rules: they are wrapped, their
``forward`` / ``backward`` in ``torch.amp.custom_fwd`` / ``custom_bwd`` per device type (:func:`autocast_functions`),
and a call picks the one of its tensors' device, so that backward runs with the autocast state (and dtypes) of the
forward, on CPU and CUDA alike.
"""

from __future__ import annotations

import torch


# The device types whose autocast the custom Functions follow (torch.amp's custom_fwd / custom_bwd take one each);
# other devices (``meta``, used to count operations) have no autocast state to ask.
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype a matrix-product-like operation on ``tensors`` runs in: autocast's dtype when autocast is enabled
    for their device type, otherwise their promoted dtype (what ``torch.bmm`` would need them cast to)."""
    device_type = tensors[0].device.type
    if device_type in AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def layer_scaled(layer_scale: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """``layer_scale · branch`` in the branch's dtype: a float32 scale would promote a bfloat16 residual stream
    to float32 under autocast, and every following product would cast it back."""
    return layer_scale.to(branch.dtype) * branch


def autocast_functions(function: type[torch.autograd.Function]) -> dict[str, type[torch.autograd.Function]]:
    """``{device type: function}`` with ``forward`` / ``backward`` wrapped by ``torch.amp.custom_fwd`` /
    ``custom_bwd`` for that device type (one subclass each, made at import so that a call is a plain dictionary
    lookup, also for ``torch.compile``). ``function.forward`` must take ``ctx`` first."""
    return {
        device_type: type(
            f"{function.__name__}_{device_type}",
            (function,),
            {
                "forward": staticmethod(torch.amp.custom_fwd(function.forward, device_type=device_type)),
                "backward": staticmethod(torch.amp.custom_bwd(function.backward, device_type=device_type)),
            },
        )
        for device_type in AUTOCAST_DEVICE_TYPES
    }


__all__ = ["AUTOCAST_DEVICE_TYPES", "autocast_functions", "compute_dtype", "layer_scaled"]
