"""The semantic-segmentation loss shared by every model of this package (SegFormer's loss).

Kept free of device synchronisation: labels are validated where the data enter (datasets, collator,
processor), not here at every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def semantic_segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Cross-entropy of `logits (B, K, h, w)` bilinearly upsampled to `labels (B, H, W)`.

    Pixels equal to ``ignore_index`` do not count (the mean is over the other pixels).
    """
    if labels.ndim != 3 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must be (batch, height, width) with batch {logits.shape[0]}, got shape {tuple(labels.shape)}"
        )
    upsampled = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(upsampled, labels.long(), ignore_index=ignore_index)


__all__ = ["semantic_segmentation_loss"]
