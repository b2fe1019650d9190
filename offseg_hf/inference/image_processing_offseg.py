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

Mask2Former folders (``mask2former`` / ``mask2former_offset``) get :class:`Mask2FormerSemanticImageProcessor`
(``build_image_processor(dataset, model_type=...)``): the same steps plus the reference's padding to a multiple of 32
and its semantic prediction from masks and classes in ``post_process_semantic_segmentation``. It is not a class of
transformers: ``AutoImageProcessor`` finds it by name once this module is imported, which ``import offseg_hf``
arranges (:mod:`offseg_hf.auto_registration`).

``OffSegImageProcessor`` (:mod:`offseg_hf.models.image_processing_offseg`, re-exported here) remains only so that
folders saved by offseg-hf ≤ 0.1 (``"image_processor_type": "OffSegImageProcessor"``) still load with
``AutoImageProcessor`` once ``offseg_hf`` is imported; it is SegformerImageProcessor unchanged and saves itself as
one, so re-saving an old folder's processor migrates it.
"""

from __future__ import annotations

import torch
from transformers import SegformerImageProcessor
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.models.segformer.image_processing_segformer import SegformerImageProcessorKwargs

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
    model_type: str | None = None,
) -> SegformerImageProcessor:
    """The image processor of OffSeg folders for ``dataset``: the paper's keep-ratio test resize and normalisation.

    Args:
        dataset: a benchmark of :data:`offseg_hf.inference.segment.PROTOCOLS` (aliases as in :mod:`offseg_hf.data.registry`,
            e.g. ``"ADE20K"``, ``"cocostuff"``), or ``"synthetic"`` (requires ``scale``).
        scale: ``(long-side limit, short-side target)`` of the keep-ratio resize; defaults to the dataset's
            protocol (``(2048, 512)`` for ADE20K).
        do_reduce_labels: whether segmentation maps given to the processor are label-reduced (raw 0 "no class" →
            255, ``v`` → ``v - 1``); defaults to the dataset's table (ADE20K and Pascal Context: ``True``).
        model_type: the model's ``config.model_type``; Mask2Former (``mask2former``, ``mask2former_offset``) gets a
            :class:`Mask2FormerSemanticImageProcessor` (the reference's padding and semantic post-processing).

    Returns:
        A ``SegformerImageProcessor`` with ``size={"shortest_edge": min(scale), "longest_edge": max(scale)}`` (a
        :class:`Mask2FormerSemanticImageProcessor` for Mask2Former).

    Raises:
        ValueError: an unknown dataset, or ``"synthetic"`` without ``scale``.
    """
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
    from offseg_hf.inference.segment import MASK_CLASSIFICATION_MODEL_TYPES

    processor_class = (
        Mask2FormerSemanticImageProcessor if model_type in MASK_CLASSIFICATION_MODEL_TYPES else SegformerImageProcessor
    )
    return processor_class(
        size={"shortest_edge": int(min(scale)), "longest_edge": int(max(scale))},
        resample=PILImageResampling.BILINEAR,
        do_convert_rgb=True,
        image_mean=OFFSEG_IMAGE_MEAN,
        image_std=OFFSEG_IMAGE_STD,
        do_reduce_labels=bool(do_reduce_labels),
    )


class Mask2FormerSemanticImageProcessorKwargs(SegformerImageProcessorKwargs, total=False):
    r"""
    size_divisor (`int`, *optional*, defaults to `self.size_divisor`):
        With `do_pad`, images are zero-padded at the bottom / right to multiples of it (label maps with 255).
    """

    size_divisor: int


class Mask2FormerSemanticImageProcessor(SegformerImageProcessor):
    """The reference's test pipeline and semantic prediction for Mask2Former folders (with or without offset learning).

    ``SegformerImageProcessor`` (RGB, resize, ``x / 255``, mean / std, label reduction) with the three steps
    mmsegmentation's Mask2Former test pipeline adds:

    * the keep-ratio resize (``size={"shortest_edge", "longest_edge"}``) rounds as mmcv does
      (:func:`offseg_hf.inference.segment.rescale_size`: a 400×300 photo becomes 683×512, not transformers' 682×512);
    * ``do_pad``: after normalisation the images are zero-padded at the bottom / right to a multiple of
      ``size_divisor`` (32), ``SegDataPreProcessor(test_cfg=dict(size_divisor=32))``; a batch is padded to one size;
    * :meth:`post_process_semantic_segmentation` of Mask2Former outputs is the reference's ``predict``:
      ``softmax`` over the K + 1 classes without the no-object class times ``sigmoid`` of the mask logits resized to
      the padded input, summed over queries, cropped to the resized image, resized to the target size, arg-max.

    ``pipeline("image-segmentation", model=folder)`` therefore gives the reference's semantic map (transformers'
    ``Mask2FormerImageProcessor`` would give a panoptic result, and its semantic post-processing multiplies at a
    fixed 384×384 before resizing). Outputs with ``logits`` are post-processed as by ``SegformerImageProcessor``.
    """

    valid_kwargs = Mask2FormerSemanticImageProcessorKwargs
    do_pad = True
    size_divisor = 32

    def resize(self, image: torch.Tensor, size: SizeDict, resample=None, **kwargs) -> torch.Tensor:
        """``size`` ``{"shortest_edge", "longest_edge"}`` with mmcv's rounding, else as ``SegformerImageProcessor``."""
        if size.shortest_edge and size.longest_edge:
            height, width = self.resized_size(tuple(image.shape[-2:]), size)
            size = SizeDict(height=height, width=width)
        return super().resize(image, size, resample, **kwargs)

    def resized_size(self, image_size: tuple[int, int], size: SizeDict | dict | None = None) -> tuple[int, int]:
        """``(height, width)`` this processor resizes an ``image_size`` image to (before the padding)."""
        from offseg_hf.inference.segment import rescale_size

        size = size if size is not None else self.size
        size = size if isinstance(size, SizeDict) else SizeDict(**size)
        height, width = int(image_size[0]), int(image_size[1])
        if not self.do_resize:
            return height, width
        if size.shortest_edge and size.longest_edge:
            return rescale_size(height, width, (size.longest_edge, size.shortest_edge))
        if size.height and size.width:
            return int(size.height), int(size.width)
        raise ValueError(f"{type(self).__name__}: cannot tell the resized size for size={dict(self.size)}; pass input_sizes")

    def _preprocess(self, images: list[torch.Tensor], do_pad: bool | None = None, size_divisor: int | None = None,
                    **kwargs):
        processed = super()._preprocess(images, **kwargs)
        if not (do_pad and size_divisor):
            return processed
        divisor = int(size_divisor)
        height = max(image.shape[-2] for image in processed)
        width = max(image.shape[-1] for image in processed)
        pad_size = SizeDict(height=-(-height // divisor) * divisor, width=-(-width // divisor) * divisor)
        fill = 0 if processed[0].is_floating_point() else 255  # images after normalisation; label maps: ignore
        return self.pad(list(processed), pad_size=pad_size, fill_value=fill)

    def post_process_semantic_segmentation(
        self,
        outputs,
        target_sizes: list[tuple[int, int]] | None = None,
        return_segmentation_scores: bool = False,
        input_sizes: list[tuple[int, int]] | None = None,
    ):
        """Label maps ``(H, W)`` (or, with ``return_segmentation_scores``, also the ``(K, H, W)`` scores) of Mask2Former
        outputs, as the reference predicts them (see the class docstring).

        Args:
            outputs: a Mask2Former output (``class_queries_logits (B, Q, K + 1)``, ``masks_queries_logits
                (B, Q, h, w)``); outputs with ``logits`` are handled as by ``SegformerImageProcessor``.
            target_sizes: ``(H, W)`` of each original image (what the pipeline passes).
            input_sizes: ``(h, w)`` of each image inside ``pixel_values`` before the padding; default: what this
                processor resizes ``target_sizes`` to (:meth:`resized_size`). Needed when the inputs were made
                otherwise.

        Raises:
            ValueError: neither size given, a size list of the wrong length, or masks whose resolution is not a
                common fraction of the padded input (inputs not made by this processor: pass ``input_sizes``).
        """
        if not hasattr(outputs, "masks_queries_logits"):
            return super().post_process_semantic_segmentation(outputs, target_sizes, return_segmentation_scores)
        from offseg_hf.inference.segment import mask_classification_label_map

        class_logits, mask_logits = outputs.class_queries_logits, outputs.masks_queries_logits
        batch = class_logits.shape[0]
        if isinstance(target_sizes, torch.Tensor):
            target_sizes = target_sizes.tolist()
        if input_sizes is None:
            if target_sizes is None:
                raise ValueError("post_process_semantic_segmentation needs target_sizes (the original image sizes) or "
                                 "input_sizes (the sizes inside pixel_values) to crop the padding")
            input_sizes = [self.resized_size(size) for size in target_sizes]
        target_sizes = input_sizes if target_sizes is None else target_sizes
        if len(input_sizes) != batch or len(target_sizes) != batch:
            raise ValueError(f"{batch} predictions but {len(target_sizes)} target sizes / {len(input_sizes)} input sizes")
        divisor = int(self.size_divisor) if self.do_pad and self.size_divisor else 1
        padded = tuple(-(-max(int(size[axis]) for size in input_sizes) // divisor) * divisor for axis in (0, 1))
        mask_size = tuple(mask_logits.shape[-2:])
        if padded[0] * mask_size[1] != padded[1] * mask_size[0] or padded[0] % mask_size[0]:
            raise ValueError(
                f"masks of {mask_size[0]}×{mask_size[1]} do not come from an input padded to {padded[0]}×{padded[1]} "
                f"(input sizes {[tuple(s) for s in input_sizes]}, from target sizes {[tuple(s) for s in target_sizes]}): "
                "pass input_sizes=[(h, w), ...], the sizes of the images inside pixel_values before padding")
        results = []
        for index in range(batch):
            label_map, scores = mask_classification_label_map(
                class_logits[index], mask_logits[index], padded, tuple(input_sizes[index]), tuple(target_sizes[index]),
                return_scores=return_segmentation_scores,
            )
            if return_segmentation_scores:
                results.append(SemanticSegmentationPostProcessorOutput(
                    data={"segmentation": label_map, "segmentation_scores": scores}))
            else:
                results.append(label_map)
        return results


__all__ = [
    "OFFSEG_IMAGE_MEAN",
    "OFFSEG_IMAGE_STD",
    "Mask2FormerSemanticImageProcessor",
    "OffSegImageProcessor",
    "build_image_processor",
]


def _register() -> None:
    """Make ``AutoImageProcessor`` resolve the Mask2Former processor by its name (``preprocessor_config.json`` of
    ``mask2former`` and ``mask2former_offset`` folders)."""
    from transformers import AutoImageProcessor

    from offseg_hf.models.modeling_mask2former_offset import Mask2FormerOffsetConfig

    AutoImageProcessor.register(
        Mask2FormerOffsetConfig, image_processor_classes={"torchvision": Mask2FormerSemanticImageProcessor}, exist_ok=True
    )


_register()
