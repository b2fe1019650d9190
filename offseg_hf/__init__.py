"""offseg-hf: OffSeg (ICCV 2025) as a Hugging Face Transformers model.

Importing the package registers OffSeg with AutoConfig, AutoModel, AutoModelForSemanticSegmentation,
AutoBackbone and AutoImageProcessor.
"""

from .configuration_offseg import EFFICIENTFORMER_V2_VARIANTS, OFFSEG_PRESETS, EfficientFormerV2Config, OffSegConfig

__version__ = "0.1.0"

__all__ = [
    "EFFICIENTFORMER_V2_VARIANTS",
    "OFFSEG_PRESETS",
    "EfficientFormerV2Config",
    "OffSegConfig",
]
