"""offseg-hf: OffSeg (ICCV 2025) as a Hugging Face Transformers model.

Importing the package registers OffSeg with AutoConfig, AutoModel, AutoModelForSemanticSegmentation and
AutoBackbone and AutoImageProcessor (the registrations live in the modeling modules themselves, so that a saved folder also
loads as remote code without this package).
"""

from .configuration_offseg import EFFICIENTFORMER_V2_VARIANTS, OFFSEG_PRESETS, EfficientFormerV2Config, OffSegConfig
from .image_processing_offseg import OffSegImageProcessor
from .modeling_efficientformer_v2 import EfficientFormerV2Backbone, EfficientFormerV2PreTrainedModel
from .modeling_offseg import (
    OffSegDecoder,
    OffSegForSemanticSegmentation,
    OffSegFreqFusion,
    OffSegModel,
    OffSegOffsetLearning,
    OffSegPreTrainedModel,
    OffSegSimilaritySampler,
    carafe,
)

__version__ = "0.1.0"

__all__ = [
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
    "OffSegOffsetLearning",
    "OffSegPreTrainedModel",
    "OffSegSimilaritySampler",
    "carafe",
]
