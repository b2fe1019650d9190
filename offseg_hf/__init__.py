"""offseg-hf: OffSeg (ICCV 2025) as a Hugging Face Transformers model.

Importing the package registers its models with the Auto classes, once, here: AutoConfig, AutoBackbone
(EfficientFormerV2), AutoModel / AutoModelForSemanticSegmentation (OffSeg, SegFormer + offset learning) and
AutoModelForUniversalSegmentation (Mask2Former + offset learning). The modeling files themselves register
nothing, so that a saved folder loaded as remote code (``trust_remote_code=True``) leaves the global Auto maps
alone.
"""

from .configuration_offseg import EFFICIENTFORMER_V2_VARIANTS, OFFSEG_PRESETS, EfficientFormerV2Config, OffSegConfig
from .image_processing_offseg import OffSegImageProcessor, build_image_processor
from .modeling_efficientformer_v2 import EfficientFormerV2Backbone, EfficientFormerV2PreTrainedModel, fold_batch_norm
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
from .configuration_segnext import MSCAN_VARIANTS, SEGNEXT_PRESETS, MscanConfig, SegNextConfig
from .modeling_segnext import (
    MscanBackbone,
    MscanPreTrainedModel,
    SegNextForSemanticSegmentation,
    SegNextHamburger,
    SegNextLightHamHead,
    SegNextNMF2D,
    SegNextPreTrainedModel,
)
from .convert_segnext import convert_mscan_state_dict, convert_segnext_state_dict


def _register_segnext() -> None:
    """SegNeXt and MSCAN with the Auto classes (``model_type`` "segnext" and "mscan")."""
    from transformers import AutoBackbone, AutoConfig, AutoModelForSemanticSegmentation

    AutoConfig.register(MscanConfig.model_type, MscanConfig, exist_ok=True)
    AutoConfig.register(SegNextConfig.model_type, SegNextConfig, exist_ok=True)
    AutoBackbone.register(MscanConfig, MscanBackbone, exist_ok=True)
    AutoModelForSemanticSegmentation.register(SegNextConfig, SegNextForSemanticSegmentation, exist_ok=True)


_register_segnext()


def _register_auto_classes() -> None:
    from transformers import (
        AutoBackbone,
        AutoConfig,
        AutoModel,
        AutoModelForSemanticSegmentation,
        AutoModelForUniversalSegmentation,
    )
    from transformers.conversion_mapping import WeightRenaming, register_checkpoint_conversion_mapping

    for config_class in (EfficientFormerV2Config, OffSegConfig, SegformerOffsetConfig, Mask2FormerOffsetConfig):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoBackbone.register(EfficientFormerV2Config, EfficientFormerV2Backbone, exist_ok=True)
    AutoModel.register(OffSegConfig, OffSegModel, exist_ok=True)
    AutoModelForSemanticSegmentation.register(OffSegConfig, OffSegForSemanticSegmentation, exist_ok=True)
    AutoModelForSemanticSegmentation.register(
        SegformerOffsetConfig, SegformerOffsetForSemanticSegmentation, exist_ok=True
    )
    AutoModelForUniversalSegmentation.register(
        Mask2FormerOffsetConfig, Mask2FormerOffsetForUniversalSegmentation, exist_ok=True
    )
    # Hub SegFormer checkpoints name the per-level projections ``decode_head.linear_c`` (transformers renames them
    # for its own class): loading one into SegformerOffsetForSemanticSegmentation needs the same renaming.
    register_checkpoint_conversion_mapping(
        SegformerOffsetForSemanticSegmentation.__name__,
        [WeightRenaming("decode_head.linear_c", "decode_head.linear_projections")],
        overwrite=True,
    )


_register_auto_classes()

__version__ = "0.1.0"

__all__ = [
    "MSCAN_VARIANTS",
    "MscanBackbone",
    "MscanConfig",
    "MscanPreTrainedModel",
    "SEGNEXT_PRESETS",
    "SegNextConfig",
    "SegNextForSemanticSegmentation",
    "SegNextHamburger",
    "SegNextLightHamHead",
    "SegNextNMF2D",
    "SegNextPreTrainedModel",
    "convert_mscan_state_dict",
    "convert_segnext_state_dict",
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
