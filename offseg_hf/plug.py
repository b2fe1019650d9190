"""Offset learning as a drop-in for existing Transformers segmentation models.

:func:`add_offset_learning` turns

* a `SegformerForSemanticSegmentation` (any size) into a
  :class:`~offseg_hf.models.modeling_segformer_offset.SegformerOffsetForSemanticSegmentation`: the 1×1 classifier is
  replaced by a 2×2 max-pool of the fused decoder feature followed by offset learning (logits at 1/8 input
  resolution), as in the paper's SegFormer variant;
* a `Mask2FormerForUniversalSegmentation` into a
  :class:`~offseg_hf.models.modeling_mask2former_offset.Mask2FormerOffsetForUniversalSegmentation`: class offsets on
  the mask embeddings and feature offsets on the pixel embeddings before every mask prediction.

The overhead is ``2·C² + K`` parameters for a decoder width C and K classes (+131,222 for C = 256, K = 150;
transformers' SegFormer-B2…B5 checkpoints use C = 768, i.e. +1.18 M, while the paper's mmsegmentation configs
keep C = 256 for every size). Every other weight is carried over unchanged, so everything before the classifier computes exactly what it did.
The result is a regular `PreTrainedModel` with its own ``model_type`` (``segformer_offset`` /
``mask2former_offset``): ``save_pretrained`` records the variant in ``config.json`` and
``AutoModelForSemanticSegmentation`` / ``AutoModelForUniversalSegmentation.from_pretrained`` rebuild it without
repeating the surgery.

Example:

```python
>>> from transformers import SegformerConfig, SegformerForSemanticSegmentation
>>> from offseg_hf.plug import add_offset_learning
>>> from offseg_hf.plug import offset_learning_overhead
>>> plain = SegformerForSemanticSegmentation(SegformerConfig(num_labels=150))
>>> model = add_offset_learning(plain)  # logs the overhead at INFO level
>>> print(offset_learning_overhead(plain, model))
SegformerForSemanticSegmentation -> SegformerOffsetForSemanticSegmentation: classifier (38,550 parameters) replaced by offset learning (169,772); +131,222 parameters (+3.50%), 3,752,694 -> 3,883,916
```
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import Mask2FormerForUniversalSegmentation, PreTrainedModel, SegformerForSemanticSegmentation
from transformers.utils import logging

from offseg_hf.models.modeling_mask2former_offset import Mask2FormerOffsetConfig, Mask2FormerOffsetForUniversalSegmentation
from offseg_hf.models.modeling_offseg import OffSegForSemanticSegmentation
from offseg_hf.models.modeling_segformer_offset import SegformerOffsetConfig, SegformerOffsetForSemanticSegmentation
from offseg_hf.models.offset_learning import OffsetLearning

logger = logging.get_logger(__name__)

SUPPORTED_MODELS = ("SegformerForSemanticSegmentation", "Mask2FormerForUniversalSegmentation")


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module`` (shared parameters counted once)."""
    return sum(parameter.numel() for parameter in module.parameters())


@dataclass(frozen=True)
class OffsetLearningOverhead:
    """Parameter cost of offset learning: what the surgery removed and added."""

    source: str
    target: str
    parameters_before: int
    parameters_after: int
    removed: int  # the classifier offset learning replaces (0 for Mask2Former)
    added: int  # offset learning itself

    @property
    def extra(self) -> int:
        """Net number of additional parameters."""
        return self.parameters_after - self.parameters_before

    @property
    def relative(self) -> float:
        """Net additional parameters relative to the original model."""
        return self.extra / self.parameters_before

    def __str__(self) -> str:
        replaced = f"classifier ({self.removed:,} parameters) replaced by" if self.removed else "added"
        return (
            f"{self.source} -> {self.target}: {replaced} offset learning ({self.added:,}); "
            f"{self.extra:+,} parameters ({self.relative:+.2%}), {self.parameters_before:,} -> {self.parameters_after:,}"
        )


def offset_learning_parameters(model: nn.Module) -> int:
    """Parameters of all offset-learning modules inside ``model``."""
    modules = [m for m in model.modules() if isinstance(m, OffsetLearning)]
    return sum(count_parameters(module) for module in modules)


def _transfer(source: PreTrainedModel, target: PreTrainedModel, dropped_prefixes: tuple[str, ...]) -> None:
    """Copy every weight of ``source`` into ``target`` except ``dropped_prefixes``; only offset learning may be new."""
    state = {key: value for key, value in source.state_dict().items() if not key.startswith(dropped_prefixes)}
    missing, unexpected = target.load_state_dict(state, strict=False)
    not_offset = [key for key in missing if ".offset_learning." not in f".{key}"]
    if not_offset or unexpected:
        raise RuntimeError(
            f"add_offset_learning: {type(source).__name__} does not map onto {type(target).__name__}: "
            f"missing {not_offset}, unexpected {list(unexpected)}"
        )


def _offset_twin(
    source: PreTrainedModel, pool_size: int, init_std: float
) -> tuple[PreTrainedModel, tuple[str, ...]]:
    """The offset-learning twin of ``source`` (fresh weights) and the ``source`` key prefixes it has no place for."""
    if isinstance(
        source,
        (SegformerOffsetForSemanticSegmentation, Mask2FormerOffsetForUniversalSegmentation, OffSegForSemanticSegmentation),
    ):
        raise ValueError(f"{type(source).__name__} already uses offset learning")
    if isinstance(source, SegformerForSemanticSegmentation):
        config = SegformerOffsetConfig.from_segformer_config(
            source.config,
            decode_head_style="transformers",
            offset_learning_pool_size=pool_size,
            offset_learning_init_std=init_std,
        )
        return SegformerOffsetForSemanticSegmentation(config), ("decode_head.classifier.",)
    if isinstance(source, Mask2FormerForUniversalSegmentation):
        config = Mask2FormerOffsetConfig.from_mask2former_config(source.config, offset_learning_init_std=init_std)
        return Mask2FormerOffsetForUniversalSegmentation(config), ()
    raise TypeError(f"add_offset_learning supports {', '.join(SUPPORTED_MODELS)}; got {type(source).__name__}")


def add_offset_learning(
    model: PreTrainedModel,
    *,
    pool_size: int = 2,
    init_std: float = 0.02,
) -> PreTrainedModel:
    """Return ``model`` with offset learning in place of its classifier (SegFormer) or before its mask
    prediction (Mask2Former). ``model`` itself is left untouched.

    Args:
        model: a `SegformerForSemanticSegmentation` or `Mask2FormerForUniversalSegmentation`.
        pool_size: SegFormer only: max-pool kernel/stride before offset learning (2, the paper's choice, gives
            logits at 1/8 resolution; 1 keeps 1/4).
        init_std: std of the truncated-normal init of the new offset-learning weights.

    Returns:
        A `SegformerOffsetForSemanticSegmentation` / `Mask2FormerOffsetForUniversalSegmentation` on the same device
        and dtype, in the same train/eval mode, sharing no storage with ``model``.

    Raises:
        TypeError: for an unsupported model class.
        ValueError: for a model that already uses offset learning.
    """
    target, dropped = _offset_twin(model, pool_size, init_std)
    _transfer(model, target, dropped)
    reference = next(model.parameters())
    target.to(device=reference.device, dtype=reference.dtype)
    target.train(model.training)
    logger.info("%s", offset_learning_overhead(model, target))  # also available via offset_learning_overhead()
    return target


def offset_learning_overhead(original: nn.Module, with_offsets: nn.Module) -> OffsetLearningOverhead:
    """Parameter overhead of ``with_offsets`` (the result of :func:`add_offset_learning`) over ``original``."""
    before, after = count_parameters(original), count_parameters(with_offsets)
    added = offset_learning_parameters(with_offsets)
    return OffsetLearningOverhead(
        source=type(original).__name__,
        target=type(with_offsets).__name__,
        parameters_before=before,
        parameters_after=after,
        removed=before - (after - added),
        added=added,
    )


__all__ = [
    "SUPPORTED_MODELS",
    "OffsetLearningOverhead",
    "add_offset_learning",
    "count_parameters",
    "offset_learning_overhead",
    "offset_learning_parameters",
]
