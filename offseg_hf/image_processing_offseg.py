"""Image processor of OffSeg: the reference preprocessing as a Transformers 5 torchvision processor.

The OffSeg reference code (mmsegmentation) feeds the network RGB images normalised on the 0–255 scale,
``(x - [123.675, 116.28, 103.53]) / [58.395, 57.12, 57.375]``. Here the same arithmetic is written the
Transformers way, ``rescale_factor = 1/255`` followed by ``image_mean = [123.675, 116.28, 103.53] / 255`` and
``image_std = [58.395, 57.12, 57.375] / 255`` (the torchvision backend fuses the two into the reference
formula). The model returns logits at a quarter of the input resolution;
:meth:`OffSegImageProcessor.post_process_semantic_segmentation` upsamples them bilinearly
(``align_corners=False``, as ``decode_head.predict`` does) to the requested size and takes the arg-max.

Only a torchvision-backend class exists: in Transformers 5 the PIL twin (``...ImageProcessorPil``) is kept
for models that predate the backend split, new models ship the torchvision processor alone.

The processor resizes every image to a fixed 512×512 by default (what ``pipeline("image-segmentation")``
uses). The paper's test protocol (keep-ratio resize, sliding window, multi-scale + flip) lives in
:mod:`offseg_hf.inference`, which calls this processor for rescaling and normalisation.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as tvF
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput
from transformers.image_processing_utils import BatchFeature
from transformers.image_transforms import group_images_by_shape, reorder_images
from transformers.image_utils import ChannelDimension, ImageInput, PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType, auto_docstring

# Normalisation statistics of the reference ``SegDataPreProcessor`` (0–255 scale), expressed on the 0–1 scale
# that follows ``rescale_factor = 1/255``. (They are the ImageNet statistics.)
OFFSEG_IMAGE_MEAN: tuple[float, float, float] = (123.675 / 255, 116.28 / 255, 103.53 / 255)
OFFSEG_IMAGE_STD: tuple[float, float, float] = (58.395 / 255, 57.12 / 255, 57.375 / 255)


def reduce_labels(label_map: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """ADE20K-style label reduction: raw 0 ("no class") becomes ``ignore_index``, every other value ``v`` becomes ``v - 1``.

    Args:
        label_map: integer tensor of any shape, e.g. ``(1, H, W)`` or ``(H, W)``.
        ignore_index: value given to raw 0 (and kept for raw ``ignore_index``).

    Returns:
        Tensor of the same shape and dtype.
    """
    if label_map.is_floating_point():
        raise TypeError(f"label maps must hold integers, got dtype {label_map.dtype}")
    wide = label_map.to(torch.int64)
    reduced = torch.where((wide == 0) | (wide == ignore_index), ignore_index, wide - 1)
    return reduced.to(label_map.dtype)


class OffSegImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    do_reduce_labels (`bool`, *optional*, defaults to `self.do_reduce_labels`):
        Whether to reduce the values of the segmentation maps by one, raw 0 becoming 255 (the ignore index). Use it
        for ADE20K and Pascal Context 59 annotations, where 0 means "no class".
    """

    do_reduce_labels: bool


@auto_docstring
class OffSegImageProcessor(TorchvisionBackend):
    r"""
    Constructs an OffSeg image processor (torchvision backend).

    Images are converted to RGB, resized to `size` (bilinear), rescaled by `1/255` and normalised with the
    statistics of the OffSeg reference code. Segmentation maps (optional) are resized with nearest-neighbour
    interpolation and optionally label-reduced; they come back as `labels` of dtype `torch.int64`.
    """

    valid_kwargs = OffSegImageProcessorKwargs
    resample = PILImageResampling.BILINEAR
    image_mean = OFFSEG_IMAGE_MEAN
    image_std = OFFSEG_IMAGE_STD
    size = {"height": 512, "width": 512}
    default_to_square = True
    crop_size = None
    do_resize = True
    do_center_crop = None
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    do_reduce_labels = False

    def __init__(self, **kwargs: Unpack[OffSegImageProcessorKwargs]):
        super().__init__(**kwargs)

    @auto_docstring
    def preprocess(
        self,
        images: ImageInput,
        segmentation_maps: ImageInput | None = None,
        **kwargs: Unpack[OffSegImageProcessorKwargs],
    ) -> BatchFeature:
        r"""
        segmentation_maps (`ImageInput`, *optional*):
            Label maps of shape `(height, width)`, one per image, to resize (nearest) along with the images.
        """
        return super().preprocess(images, segmentation_maps, **kwargs)

    def _preprocess_image_like_inputs(
        self,
        images: ImageInput,
        segmentation_maps: ImageInput | None,
        do_convert_rgb: bool,
        input_data_format: ChannelDimension,
        return_tensors: str | TensorType | None,
        device: Union[str, "torch.device"] | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Prepare images (always) and segmentation maps (when given), then run :meth:`_preprocess` on each."""
        images = self._prepare_image_like_inputs(
            images=images, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format, device=device
        )
        data = {"pixel_values": self._preprocess(images, **{**kwargs, "do_reduce_labels": False})}

        if segmentation_maps is not None:
            maps = self._prepare_image_like_inputs(
                images=segmentation_maps,
                expected_ndims=2,
                do_convert_rgb=False,
                input_data_format=ChannelDimension.FIRST,
                device=device,
            )
            if len(maps) != len(images):
                raise ValueError(f"got {len(images)} images but {len(maps)} segmentation maps")
            map_kwargs = {
                **kwargs,
                "do_rescale": False,
                "do_normalize": False,
                "resample": tvF.InterpolationMode.NEAREST_EXACT,
            }
            maps = self._preprocess(maps, **map_kwargs)
            data["labels"] = [label_map.squeeze(0).to(torch.int64) for label_map in maps]

        return BatchFeature(data=data, tensor_type=return_tensors)

    def _preprocess(
        self,
        images: list[torch.Tensor],
        do_reduce_labels: bool,
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling | tvF.InterpolationMode | None,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | tuple[float, ...],
        image_std: float | tuple[float, ...],
        disable_grouping: bool | None,
        **kwargs,
    ) -> list[torch.Tensor]:
        """Label reduction (maps only), resize, then fused rescale + normalise; images keep their ``(C, H, W)`` shapes."""
        if do_reduce_labels:
            images = [reduce_labels(image) for image in images]

        if do_resize:
            grouped, index = group_images_by_shape(images, disable_grouping=disable_grouping)
            resized = {shape: self.resize(stack, size=size, resample=resample) for shape, stack in grouped.items()}
            images = reorder_images(resized, index)

        grouped, index = group_images_by_shape(images, disable_grouping=disable_grouping)
        processed = {
            shape: self.rescale_and_normalize(stack, do_rescale, rescale_factor, do_normalize, image_mean, image_std)
            for shape, stack in grouped.items()
        }
        return reorder_images(processed, index)

    def post_process_semantic_segmentation(
        self,
        outputs,
        target_sizes: list[tuple[int, int]] | torch.Tensor | None = None,
        return_segmentation_scores: bool = False,
    ) -> list[torch.Tensor] | list[SemanticSegmentationPostProcessorOutput]:
        """
        Turn the output of [`OffSegForSemanticSegmentation`] into label maps.

        Args:
            outputs: model output with `logits` of shape `(batch_size, num_labels, h, w)` (a quarter of the input
                resolution for OffSeg).
            target_sizes (`list[tuple[int, int]]` of length `batch_size`, *optional*): `(height, width)` of each
                prediction, usually the size of the original image (careful: PIL's `image.size` is
                `(width, height)`). The logits are upsampled bilinearly (`align_corners=False`) to it before the
                arg-max. If unset, the label maps stay at the logits' resolution.
            return_segmentation_scores (`bool`, *optional*, defaults to `False`): also return the (resized) logits.

        Returns:
            `list[torch.Tensor]`: one `(height, width)` `torch.int64` label map per image; or, with
            `return_segmentation_scores=True`, one [`SemanticSegmentationPostProcessorOutput`] per image with
            `segmentation` (the label map) and `segmentation_scores` (`(num_labels, height, width)` logits).
        """
        logits = outputs.logits
        if target_sizes is not None and len(target_sizes) != len(logits):
            raise ValueError(
                f"got {len(target_sizes)} target sizes for a batch of {len(logits)} logits; pass one (height, width) "
                "per image"
            )
        results = []
        for index in range(len(logits)):
            scores = logits[index]
            if target_sizes is not None:
                height, width = (int(v) for v in target_sizes[index])
                scores = F.interpolate(scores[None], size=(height, width), mode="bilinear", align_corners=False)[0]
            results.append(
                SemanticSegmentationPostProcessorOutput(
                    data={"segmentation": scores.argmax(dim=0), "segmentation_scores": scores}
                )
            )
        if not return_segmentation_scores:
            return [result.segmentation for result in results]
        return results


__all__ = ["OFFSEG_IMAGE_MEAN", "OFFSEG_IMAGE_STD", "OffSegImageProcessor", "reduce_labels"]


def _register() -> None:
    """Make ``AutoImageProcessor`` resolve OffSeg folders (importing this module is enough)."""
    from transformers import AutoImageProcessor

    from .configuration_offseg import OffSegConfig

    AutoImageProcessor.register(OffSegConfig, image_processor_classes={"torchvision": OffSegImageProcessor}, exist_ok=True)


_register()
# save_pretrained writes an ``auto_map`` entry and copies this file next to the preprocessor config, so a saved
# folder also loads with ``AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)`` without offseg_hf.
OffSegImageProcessor.register_for_auto_class("AutoImageProcessor")
