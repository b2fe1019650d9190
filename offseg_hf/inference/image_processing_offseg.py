"""OffSeg's image processor: transformers' own ``SegformerImageProcessor``, configured per dataset.

OffSeg needs nothing SegFormer's processor lacks: RGB conversion, a resize, ``x / 255`` followed by the reference
normalisation ``(x - [123.675, 116.28, 103.53]) / [58.395, 57.12, 57.375]`` (0–255 scale; the ImageNet statistics),
ADE20K-style label reduction, and the bilinear (``align_corners=False``) upsampling of the logits before the
arg-max in ``post_process_semantic_segmentation``. A saved folder therefore names the built-in class
(``"image_processor_type": "SegformerImageProcessor"``) and carries no processor code and no ``auto_map``, so that
``AutoImageProcessor`` and ``pipeline("image-segmentation")`` never need remote code for it.

:func:`build_image_processor` is the one place that configures it: the paper's keep-ratio test resize of the
dataset (:data:`offseg_hf.inference.segment.PROTOCOLS`) as Transformers' size dict, ``{"shortest_edge": 512,
"longest_edge": 2048}`` for ADE20K and COCO-Stuff, ``{1024, 2048}`` for Cityscapes, ``{520, 520}`` for Pascal
Context, and ``do_reduce_labels`` as the dataset's annotations need it. Converted (:mod:`offseg_hf.conversion.convert`) and
trained (:mod:`offseg_hf.training.train`) folders of the same dataset save the same processor.

Rounding. Transformers' keep-ratio resize (``get_size_with_aspect_ratio``) truncates the long side, mmcv's
``imrescale`` (the reference test pipeline, :func:`offseg_hf.inference.segment.rescale_size`) rounds it half up: a 400×300
photo becomes 682×512 here and 683×512 in the reference. The two agree whenever the short side already has the
target length (683×512 ADE20K images stay as they are) or the long side's fraction is below one half. The paper's
protocol is :func:`offseg_hf.segment`, which keeps mmcv's sizes and uses this processor only to resize to the
size it chose and to normalise.

``OffSegImageProcessor`` (:mod:`offseg_hf.models.image_processing_offseg`, re-exported here) remains only so that
folders saved by offseg-hf ≤ 0.1 (``"image_processor_type": "OffSegImageProcessor"``) still load with
``AutoImageProcessor`` once ``offseg_hf`` is imported; it is SegformerImageProcessor unchanged and saves itself as
one, so re-saving an old folder's processor migrates it.
"""

from __future__ import annotations

from transformers import Mask2FormerImageProcessor, SegformerImageProcessor
from transformers.image_utils import PILImageResampling

from offseg_hf.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from offseg_hf.models.image_processing_offseg import OffSegImageProcessor  # re-exported: the legacy folders' class

# Normalisation statistics of the reference ``SegDataPreProcessor`` (0–255 scale), expressed on the 0–1 scale
# that follows ``rescale_factor = 1/255``. (They are the ImageNet statistics.)
OFFSEG_IMAGE_MEAN: tuple[float, ...] = tuple(value / 255 for value in IMAGENET_MEAN)
OFFSEG_IMAGE_STD: tuple[float, ...] = tuple(value / 255 for value in IMAGENET_STD)


def build_image_processor(
    dataset: str = "ade20k",
    *,
    scale: tuple[int, int] | None = None,
    do_reduce_labels: bool | None = None,
) -> SegformerImageProcessor:
    """The image processor of OffSeg folders for ``dataset``: the paper's keep-ratio test resize and normalisation.

    Args:
        dataset: a benchmark of :data:`offseg_hf.inference.segment.PROTOCOLS` (aliases as in :mod:`offseg_hf.data.registry`,
            e.g. ``"ADE20K"``, ``"cocostuff"``), or ``"synthetic"`` (requires ``scale``).
        scale: ``(long-side limit, short-side target)`` of the keep-ratio resize; defaults to the dataset's
            protocol (``(2048, 512)`` for ADE20K).
        do_reduce_labels: whether segmentation maps given to the processor are label-reduced (raw 0 "no class" →
            255, ``v`` → ``v - 1``); defaults to the dataset's table (ADE20K and Pascal Context: ``True``).

    Returns:
        A ``SegformerImageProcessor`` with ``size={"shortest_edge": min(scale), "longest_edge": max(scale)}``.

    Raises:
        ValueError: an unknown dataset, or ``"synthetic"`` without ``scale``.
    """
    scale, do_reduce_labels = _test_pipeline(dataset, scale, do_reduce_labels)
    return SegformerImageProcessor(
        size={"shortest_edge": int(min(scale)), "longest_edge": int(max(scale))},
        resample=PILImageResampling.BILINEAR,
        do_convert_rgb=True,
        image_mean=OFFSEG_IMAGE_MEAN,
        image_std=OFFSEG_IMAGE_STD,
        do_reduce_labels=do_reduce_labels,
    )


def build_mask2former_image_processor(
    dataset: str = "ade20k", *, scale: tuple[int, int] | None = None, do_reduce_labels: bool | None = None
) -> Mask2FormerImageProcessor:
    """The image processor of Mask2Former (+ offset learning) folders: transformers' ``Mask2FormerImageProcessor``
    with the reference test pipeline of ``dataset`` (arguments as :func:`build_image_processor`).

    The same keep-ratio resize and normalisation as OffSeg's, label reduction as the dataset needs it (255
    ignored), and ``size_divisor=0``: transformers' default (32) stretches the resized image to a multiple of 32,
    where the reference's ``SegDataPreProcessor`` zero-pads it (bottom / right, after normalisation) and crops the
    prediction back. Batches are padded bottom / right to their largest image, as the reference pads them.
    """
    scale, do_reduce_labels = _test_pipeline(dataset, scale, do_reduce_labels)
    from offseg_hf.data.registry import get_dataset_info

    return Mask2FormerImageProcessor(
        size={"shortest_edge": int(min(scale)), "longest_edge": int(max(scale))},
        size_divisor=0,
        resample=PILImageResampling.BILINEAR,
        do_convert_rgb=True,
        image_mean=OFFSEG_IMAGE_MEAN,
        image_std=OFFSEG_IMAGE_STD,
        do_reduce_labels=do_reduce_labels,
        ignore_index=255,
        num_labels=None if dataset.lower() == "synthetic" else get_dataset_info(dataset).num_labels,
    )


def _test_pipeline(dataset: str, scale: tuple[int, int] | None, do_reduce_labels: bool | None) -> tuple[tuple[int, int], bool]:
    """``(scale, do_reduce_labels)`` of ``dataset``'s test pipeline; given values are checked and kept."""
    from offseg_hf.data.registry import get_dataset_info
    from offseg_hf.inference.segment import get_protocol

    synthetic = dataset.lower() == "synthetic"
    if scale is None:
        if synthetic:
            raise ValueError("build_image_processor('synthetic') needs scale=(size, size): the scenes have no protocol")
        scale = get_protocol(dataset).scale
    if len(scale) != 2 or min(scale) < 1:
        raise ValueError(f"scale must be two positive integers (long-side limit, short-side target), got {scale!r}")
    if do_reduce_labels is None:
        do_reduce_labels = False if synthetic else get_dataset_info(dataset).reduce_labels
    return scale, bool(do_reduce_labels)


__all__ = [
    "OFFSEG_IMAGE_MEAN",
    "OFFSEG_IMAGE_STD",
    "OffSegImageProcessor",
    "build_image_processor",
    "build_mask2former_image_processor",
]
