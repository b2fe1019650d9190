"""offseg-hf: OffSeg (ICCV 2025) as a Hugging Face Transformers model.

Importing the package registers OffSeg with AutoConfig, AutoModel, AutoModelForSemanticSegmentation and
AutoBackbone and AutoImageProcessor (the registrations live in the modeling modules themselves, so that a saved folder also
loads as remote code without this package).
"""

from .configuration_offseg import EFFICIENTFORMER_V2_VARIANTS, OFFSEG_PRESETS, EfficientFormerV2Config, OffSegConfig
from .image_processing_offseg import OffSegImageProcessor, build_image_processor
from .modeling_efficientformer_v2 import EfficientFormerV2Backbone, EfficientFormerV2PreTrainedModel
from .modeling_offseg import (
    OffSegDecoder,
    OffSegForSemanticSegmentation,
    OffSegFreqFusion,
    OffSegModel,
    OffSegPreTrainedModel,
    OffSegSimilaritySampler,
    carafe,
)
from .offset_learning import OffsetLearning
from .inference import SegmentationProtocol, SegmentationResult, segment, segment_image
from .modeling_mask2former_offset import Mask2FormerOffsetConfig, Mask2FormerOffsetForUniversalSegmentation
from .modeling_segformer_offset import SegformerOffsetConfig, SegformerOffsetForSemanticSegmentation
from .plug import add_offset_learning, offset_learning_overhead
from .convert_segformer import convert_segformer_offset_state_dict

__version__ = "0.1.0"

__all__ = [
    "Mask2FormerOffsetConfig",
    "Mask2FormerOffsetForUniversalSegmentation",
    "SegformerOffsetConfig",
    "SegformerOffsetForSemanticSegmentation",
    "SegmentationProtocol",
    "SegmentationResult",
    "add_offset_learning",
    "build_image_processor",
    "convert_segformer_offset_state_dict",
    "offset_learning_overhead",
    "segment",
    "segment_image",
    "EFFICIENTFORMER_V2_VARIANTS",
    "OFFSEG_PRESETS",
    "EfficientFormerV2Backbone",
    "EfficientFormerV2Config",
    "EfficientFormerV2PreTrainedModel",
    "OffSegConfig",
    "OffSegDecoder",
    "OffSegForSemanticSegmentation",
    "OffSegImageProcessor",
    "OffSegFreqFusion",
    "OffSegModel",
    "OffsetLearning",
    "OffSegPreTrainedModel",
    "OffSegSimilaritySampler",
    "carafe",
]
