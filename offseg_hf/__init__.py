"""offseg-hf: OffSeg (ICCV 2025) as a Hugging Face Transformers model.

The package is laid out by job (see README, "Where things are"):

* :mod:`offseg_hf.models`: configurations and modeling files (what a saved folder ships as remote code);
* :mod:`offseg_hf.data`: dataset specs, loaders, label tables, transforms;
* :mod:`offseg_hf.inference`: the paper's test protocol (:func:`segment`), the image processor, ``offseg predict``'s
  library part, visualisation, the web demo;
* :mod:`offseg_hf.evaluation`: mIoU / mAcc / aAcc and ``offseg evaluate``'s library part;
* :mod:`offseg_hf.training`: the Trainer recipe and crash-safe checkpoints;
* :mod:`offseg_hf.conversion`: official checkpoints → Transformers folders, model cards;
* :mod:`offseg_hf.deploy`: ONNX export verified in ONNX Runtime, the ONNX Runtime network, bfloat16 / int8;
* :mod:`offseg_hf.cli`: the ``offseg`` command line (``python -m offseg_hf`` is the same).

``import offseg_hf`` activates every model with transformers' Auto classes and pipelines: afterwards
``AutoModelForSemanticSegmentation.from_pretrained(folder)`` and ``pipeline("image-segmentation", model=folder)`` load
the installed classes, no ``trust_remote_code`` needed (:mod:`offseg_hf.auto_registration`: at once if transformers
is already imported, else right after it is). This module itself imports nothing heavy: the names below are loaded on
first use (PEP 562), so that ``offseg --help`` starts without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from offseg_hf.auto_registration import activate_models

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    **{
        name: "offseg_hf.models"
        for name in (
            "EFFICIENTFORMER_V2_VARIANTS", "MSCAN_VARIANTS", "OFFSEG_PRESETS", "SEGNEXT_PRESETS",
            "EfficientFormerV2Backbone", "EfficientFormerV2Config", "EfficientFormerV2PreTrainedModel",
            "Mask2FormerOffsetConfig", "Mask2FormerOffsetForUniversalSegmentation",
            "MscanBackbone", "MscanConfig", "MscanPreTrainedModel",
            "OffSegConfig", "OffSegDecoder", "OffSegImageProcessor", "OffSegForSemanticSegmentation", "OffSegFreqFusion", "OffSegModel",
            "OffSegPreTrainedModel", "OffSegSimilaritySampler", "OffsetLearning",
            "SegformerOffsetConfig", "SegformerOffsetForSemanticSegmentation",
            "SegNextConfig", "SegNextForSemanticSegmentation", "SegNextHamburger", "SegNextLightHamHead",
            "SegNextNMF2D", "SegNextPreTrainedModel", "SWIN_SIZES", "carafe", "fold_batch_norm",
            "mask2former_swin_config",
        )
    },
    "build_image_processor": "offseg_hf.inference.image_processing_offseg",
    "SegmentationProtocol": "offseg_hf.inference.segment",
    "SegmentationResult": "offseg_hf.inference.segment",
    "segment": "offseg_hf.inference.segment",
    "segment_image": "offseg_hf.inference.segment",
    "export_onnx": "offseg_hf.deploy.onnx_export",
    "add_offset_learning": "offseg_hf.plug",
    "offset_learning_overhead": "offseg_hf.plug",
    "convert_segformer_offset_state_dict": "offseg_hf.conversion.segformer",
    "convert_mscan_state_dict": "offseg_hf.conversion.segnext",
    "convert_segnext_state_dict": "offseg_hf.conversion.segnext",
    "convert_mask2former_state_dict": "offseg_hf.conversion.mask2former",
}

__all__ = sorted(_LAZY)

activate_models()


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'offseg_hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


if TYPE_CHECKING:  # what static analysers and IDEs see
    from offseg_hf.conversion.mask2former import convert_mask2former_state_dict
    from offseg_hf.conversion.segformer import convert_segformer_offset_state_dict
    from offseg_hf.conversion.segnext import convert_mscan_state_dict, convert_segnext_state_dict
    from offseg_hf.deploy.onnx_export import export_onnx
    from offseg_hf.inference.image_processing_offseg import build_image_processor
    from offseg_hf.inference.segment import SegmentationProtocol, SegmentationResult, segment, segment_image
    from offseg_hf.models import *  # noqa: F403
    from offseg_hf.plug import add_offset_learning, offset_learning_overhead
