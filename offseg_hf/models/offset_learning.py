"""Offset learning (OffSeg, ICCV 2025, Sec. 3.3, Eq. 4–13): the one implementation every model here uses.

A per-pixel classifier computes masks ``M = W·Eᵀ`` from class embeddings W `(K, C)` and pixel features E
`(HW, C)`. Offset learning aligns both before that product:

* coupled attention ``A = W·Eᵀ`` (K×HW, no 1/√C scaling)                              (Eq. 4)
* class offset ``ΔW = class_offset_proj(softmax_HW(A)·E)``, ``W' = W + ΔW``             (Eq. 5–8)
* feature offset ``ΔE = feature_offset_proj(softmax_K(A)ᵀ·W)``, ``E' = E + ΔE``        (Eq. 9–12)
* masks ``M = E'·W'ᵀ`` (+ a LayerNorm over the K class scores of each pixel when W is learned)   (Eq. 13)

:class:`OffsetLearning` serves two uses:

* **as a classifier** (``num_labels`` given: OffSeg, SegFormer / SegNeXt w/ offset learning): W is a learned
  parameter ``class_embeddings`` shared by all images; ``forward(features)`` returns the LayerNorm-ed masks
  `(B, K, H, W)` — a drop-in replacement for a 1×1 classifier;
* **between given embeddings** (no ``num_labels``: Mask2Former w/ offset learning, the reference
  ``Offset_Learning_Mask``): W are per-image query mask embeddings `(B, Q, C)`; :meth:`align` returns the
  aligned pair ``(W', E')`` and :meth:`masks` their product, without normalisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .precision import compute_dtype


def check_num_labels(num_labels: int | None, model_name: str) -> None:
    """The class count every model here needs, checked in one place: by each configuration when it is built and by
    each model when it is built from one (a config changed afterwards, ``config.num_labels = 1``, reaches only the
    latter). With one class, semantic segmentation labels every pixel with it, its cross-entropy is exactly 0 so
    nothing is learned, and offset learning's LayerNorm over the class scores is constant.

    Raises:
        ValueError: ``num_labels`` is missing or below 2 (the message names the model and the fix).
    """
    if num_labels is None or num_labels < 2:
        raise ValueError(
            f"{model_name} needs num_labels >= 2, got {num_labels}: with one class every pixel gets it, the "
            "cross-entropy loss is 0 and nothing is learned (offset learning's LayerNorm over the class scores is "
            "constant too). For binary segmentation use num_labels=2 (background, foreground)."
        )


class OffsetLearning(nn.Module):
    """Offset learning between class embeddings W and pixel features E (Eq. 4–13).

    Args:
        hidden_size: C, the width of W and E.
        num_labels: K. When given, W is the learned parameter ``class_embeddings`` `(K, C)` and
            :meth:`forward` applies the LayerNorm ``mask_norm`` over the K scores (Eq. 13); when `None`, W is
            passed to :meth:`align` / :meth:`masks` by the caller.
        layer_norm_eps: epsilon of ``mask_norm``.
    """

    class_multiple = 8
    """The products with K columns run on K rounded up to a multiple of this (see ``_scores``); 1 runs them on K
    itself (``benchmarks.models.count_macs`` does, to count the function's multiply-adds, not the kernels')."""

    def __init__(self, hidden_size: int, num_labels: int | None = None, layer_norm_eps: float = 1e-5):
        super().__init__()
        self.class_offset_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.feature_offset_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        if num_labels is not None:
            self.class_embeddings = nn.Parameter(torch.zeros(num_labels, hidden_size))
            self.mask_norm = nn.LayerNorm(num_labels, eps=layer_norm_eps)
        else:
            self.class_embeddings = None
            self.mask_norm = None

    @staticmethod
    def coupled_attention(pixels: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        """``Aᵀ`` `(B, HW, K)` (the transpose of the paper's K×HW) for E `(B, HW, C)`, W `(K, C)` or `(B, K, C)` (Eq. 4)."""
        return pixels @ class_embeddings.transpose(-1, -2)

    def class_offset(self, attention: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """``ΔW`` `(B, K, C)`: the features pooled per class by a softmax over pixels, projected (Eq. 5–8).

        Eager and compiled, the softmax is normalised after pooling, ``Σ_p e^(A_pk − m_k)·E_p / Σ_p e^(A_pk − m_k)``
        with ``m_k`` the class's maximum: the same function without a softmax over the (non-last) pixel axis,
        faster on CPU (16384 pixels × 150 classes: 18 vs 22 ms with the product) and nearer float64 (1e-7 vs 1e-6).
        Exported, it stays a Softmax (ONNX Runtime's kernel keeps its verification within 1e-4; a spelled-out
        sum over the pixels did not).
        """
        if torch.compiler.is_exporting() or attention.dtype == torch.float16:
            # float16 too: the unnormalised pooled sums (up to HW·|E|) overflow its range of 65504.
            return self.class_offset_proj(attention.softmax(dim=1).transpose(1, 2) @ pixels)
        weights = (attention - attention.amax(dim=1, keepdim=True)).exp()  # (B, HW, K)
        pooled = (weights.transpose(1, 2) @ pixels) / weights.sum(dim=1).unsqueeze(-1)
        return self.class_offset_proj(pooled)

    def feature_offset(self, attention: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        """``ΔE`` `(B, HW, C)`: the class embeddings mixed per pixel by a softmax over classes, projected (Eq. 9–12)."""
        return self.feature_offset_proj(attention.softmax(dim=2) @ class_embeddings)

    @staticmethod
    def _check(pixel_embeddings: torch.Tensor, class_embeddings: torch.Tensor) -> None:
        batch, channels = pixel_embeddings.shape[:2]
        fits = class_embeddings.shape[-1] == channels and (
            class_embeddings.ndim == 2 or (class_embeddings.ndim == 3 and class_embeddings.shape[0] == batch)
        )
        if pixel_embeddings.ndim != 4 or not fits:
            raise ValueError(
                f"offset learning: class embeddings {tuple(class_embeddings.shape)} do not fit pixel embeddings "
                f"{tuple(pixel_embeddings.shape)}; expected (B, C, H, W) with (K, C) or (B, K, C)"
            )

    def _operands(self, pixel_embeddings: torch.Tensor, class_embeddings: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked E as `(B, HW, C)` and W in the products' dtype (autocast's under autocast: W + ΔW would
        otherwise be promoted to float32)."""
        self._check(pixel_embeddings, class_embeddings)
        class_embeddings = class_embeddings.to(compute_dtype(pixel_embeddings, class_embeddings))
        return pixel_embeddings.flatten(2).transpose(1, 2), class_embeddings

    def align(
        self, pixel_embeddings: torch.Tensor, class_embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The aligned pair (Eq. 4–12): ``W'`` `(B, K, C)` and ``E'`` `(B, C, H, W)`.

        Args:
            pixel_embeddings: E as `(B, C, H, W)`.
            class_embeddings: W as `(K, C)` (shared) or `(B, K, C)` (per image).
        """
        pixels, class_embeddings = self._operands(pixel_embeddings, class_embeddings)
        batch, channels, height, width = pixel_embeddings.shape
        attention = self.coupled_attention(pixels, class_embeddings)  # Aᵀ: (B, HW, K)
        aligned_classes = class_embeddings + self.class_offset(attention, pixels)  # W': (B, K, C)
        aligned_pixels = pixels + self.feature_offset(attention, class_embeddings)  # E': (B, HW, C)
        return aligned_classes, aligned_pixels.transpose(1, 2).reshape(batch, channels, height, width)

    def masks(self, pixel_embeddings: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        """Mask logits ``E'·W'ᵀ`` `(B, K, H, W)` (Eq. 13 before the LayerNorm), without building E'.

        The product is re-associated: ``E'·W'ᵀ = E·W'ᵀ + softmax_K(A)·(W·P_fᵀ·W'ᵀ)`` with ``P_f`` the weight
        of ``feature_offset_proj``. That is the same function as ``(E + ΔE)·W'ᵀ`` up to float rounding, for
        HW·K² instead of HW·C² multiply-adds (K ≤ C for every model here).
        """
        batch, _, height, width = pixel_embeddings.shape
        return self._scores(pixel_embeddings, class_embeddings).transpose(1, 2).reshape(batch, -1, height, width)

    def _scores(self, pixel_embeddings: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        """``E'·W'ᵀ`` as `(B, HW, K)`, re-associated as described in :meth:`masks`.

        The three products with K columns run on K rounded up to a multiple of 8 (zero class embeddings appended,
        their columns cut off as views): the same values, and on a CPU the matrix-product kernels (MKL, oneDNN)
        handle 150 columns 1.3–1.5× slower than 152 (16384 pixels × 256 channels, 2 threads, AMD EPYC AVX2:
        E·Wᵀ 15.8 vs 12.1 ms, the K×K mixing 8.9 vs 6.5 ms, interleaved; offset learning of OffSeg-T at 512²: 44 vs
        52 ms). :attr:`class_multiple` sets the rounding.
        """
        pixels, class_embeddings = self._operands(pixel_embeddings, class_embeddings)
        num_classes = class_embeddings.shape[-2]
        padding = (0, 0, 0, -num_classes % self.class_multiple)  # zero rows appended to a (…, K, C) matrix
        attention = self.coupled_attention(pixels, F.pad(class_embeddings, padding))[..., :num_classes]  # Aᵀ: (B, HW, K)
        aligned = F.pad(class_embeddings + self.class_offset(attention, pixels), padding).transpose(1, 2)  # W'ᵀ (B, C, K)
        mixed = self.feature_offset_proj(class_embeddings) @ aligned  # W·P_fᵀ·W'ᵀ: (B, K, K)
        scores = torch.baddbmm(pixels @ aligned, attention.softmax(dim=2), mixed)  # E'·W'ᵀ: (B, HW, K)
        return scores[..., :num_classes]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The classifier form: features E `(B, C, H, W)` → ``mask_norm(E'·W'ᵀ)`` `(B, K, H, W)` with the learned W."""
        if self.class_embeddings is None:
            raise TypeError("this OffsetLearning has no learned class embeddings (num_labels=None): use masks() or align()")
        batch, _, height, width = features.shape
        scores = self.mask_norm(self._scores(features, self.class_embeddings))  # LayerNorm over K (Eq. 13)
        return scores.transpose(1, 2).reshape(batch, -1, height, width)


__all__ = ["OffsetLearning"]
