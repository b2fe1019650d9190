"""The models: what a saved folder ships as remote code (``trust_remote_code=True``), one flat folder.

``configuration_*.py`` and ``modeling_*.py`` (OffSeg, its EfficientFormerV2 backbone, SegFormer / Mask2Former with
offset learning, SegNeXt and its MSCAN backbone) import only each other, ``offset_learning.py`` and ``loss.py``
(relative imports), so that ``save_pretrained`` copies a self-contained set of files next to the weights.

Importing this package (which ``import offseg_hf`` arranges as soon as transformers is imported, see
:mod:`offseg_hf.auto_registration`) registers the models with the Auto classes, once, here: AutoConfig, AutoBackbone
(EfficientFormerV2, MSCAN), AutoImageProcessor (the legacy OffSeg processor), AutoModel /
AutoModelForSemanticSegmentation (OffSeg, SegFormer + offset learning, SegNeXt, Mask2Former + offset learning) and
AutoModelForUniversalSegmentation (Mask2Former + offset learning), and names them in the tables the
image-segmentation pipeline checks. The modeling files themselves register nothing,
so that a saved folder loaded as remote code leaves the global Auto maps alone.
"""

from .configuration_offseg import EFFICIENTFORMER_V2_VARIANTS, OFFSEG_PRESETS, EfficientFormerV2Config, OffSegConfig
from .configuration_segnext import MSCAN_VARIANTS, SEGNEXT_PRESETS, MscanConfig, SegNextConfig
from .image_processing_offseg import OffSegImageProcessor
from .modeling_efficientformer_v2 import EfficientFormerV2Backbone, EfficientFormerV2PreTrainedModel, fold_batch_norm
from .modeling_mask2former_offset import (
    SWIN_SIZES,
    Mask2FormerOffsetConfig,
    Mask2FormerOffsetForUniversalSegmentation,
    mask2former_swin_config,
)
from .modeling_offseg import (
    OffSegDecoder,
    OffSegForSemanticSegmentation,
    OffSegFreqFusion,
    OffSegModel,
    OffSegPreTrainedModel,
    OffSegSimilaritySampler,
    carafe,
)
from .modeling_segformer_offset import SegformerOffsetConfig, SegformerOffsetForSemanticSegmentation
from .modeling_segnext import (
    MscanBackbone,
    MscanPreTrainedModel,
    SegNextForSemanticSegmentation,
    SegNextHamburger,
    SegNextLightHamHead,
    SegNextNMF2D,
    SegNextPreTrainedModel,
)
from .offset_learning import OffsetLearning


def _register_auto_classes() -> None:
    from transformers import (
        AutoBackbone,
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForSemanticSegmentation,
        AutoModelForUniversalSegmentation,
    )
    from transformers.conversion_mapping import WeightRenaming, register_checkpoint_conversion_mapping

    for config_class in (EfficientFormerV2Config, OffSegConfig, SegformerOffsetConfig, Mask2FormerOffsetConfig,
                         MscanConfig, SegNextConfig):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoBackbone.register(EfficientFormerV2Config, EfficientFormerV2Backbone, exist_ok=True)
    AutoBackbone.register(MscanConfig, MscanBackbone, exist_ok=True)
    AutoModel.register(OffSegConfig, OffSegModel, exist_ok=True)
    # Folders saved by offseg-hf 0.1, and folders with a model config but no preprocessor_config.json
    AutoImageProcessor.register(OffSegConfig, image_processor_classes={"torchvision": OffSegImageProcessor}, exist_ok=True)
    AutoModelForSemanticSegmentation.register(OffSegConfig, OffSegForSemanticSegmentation, exist_ok=True)
    AutoModelForSemanticSegmentation.register(
        SegformerOffsetConfig, SegformerOffsetForSemanticSegmentation, exist_ok=True
    )
    AutoModelForSemanticSegmentation.register(SegNextConfig, SegNextForSemanticSegmentation, exist_ok=True)
    AutoModelForUniversalSegmentation.register(
        Mask2FormerOffsetConfig, Mask2FormerOffsetForUniversalSegmentation, exist_ok=True
    )
    # also a semantic-segmentation model: what pipeline("image-segmentation") and `offseg predict` load
    AutoModelForSemanticSegmentation.register(
        Mask2FormerOffsetConfig, Mask2FormerOffsetForUniversalSegmentation, exist_ok=True
    )
    # The image-segmentation pipeline checks a model's class name against transformers' built-in name tables (a plain
    # dict copy, blind to the registrations above) and logs "not supported" for any other: add our names there, keyed
    # by our model types (the Auto classes resolve those through the registrations above, never through these tables).
    from transformers.models.auto import modeling_auto

    for table, model_class in (
        (modeling_auto.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES, OffSegForSemanticSegmentation),
        (modeling_auto.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES, SegformerOffsetForSemanticSegmentation),
        (modeling_auto.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES, SegNextForSemanticSegmentation),
        (modeling_auto.MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES, Mask2FormerOffsetForUniversalSegmentation),
    ):
        table.setdefault(model_class.config_class.model_type, model_class.__name__)
    # Hub SegFormer checkpoints name the per-level projections ``decode_head.linear_c`` (transformers renames them
    # for its own class): loading one into SegformerOffsetForSemanticSegmentation needs the same renaming.
    register_checkpoint_conversion_mapping(
        SegformerOffsetForSemanticSegmentation.__name__,
        [WeightRenaming("decode_head.linear_c", "decode_head.linear_projections")],
        overwrite=True,
    )


_register_auto_classes()

__all__ = [
    "EFFICIENTFORMER_V2_VARIANTS",
    "MSCAN_VARIANTS",
    "OFFSEG_PRESETS",
    "SEGNEXT_PRESETS",
    "SWIN_SIZES",
    "EfficientFormerV2Backbone",
    "EfficientFormerV2Config",
    "EfficientFormerV2PreTrainedModel",
    "Mask2FormerOffsetConfig",
    "Mask2FormerOffsetForUniversalSegmentation",
    "MscanBackbone",
    "MscanConfig",
    "MscanPreTrainedModel",
    "OffSegConfig",
    "OffSegDecoder",
    "OffSegForSemanticSegmentation",
    "OffSegFreqFusion",
    "OffSegImageProcessor",
    "OffSegModel",
    "OffSegPreTrainedModel",
    "OffSegSimilaritySampler",
    "OffsetLearning",
    "SegformerOffsetConfig",
    "SegformerOffsetForSemanticSegmentation",
    "SegNextConfig",
    "SegNextForSemanticSegmentation",
    "SegNextHamburger",
    "SegNextLightHamHead",
    "SegNextNMF2D",
    "SegNextPreTrainedModel",
    "carafe",
    "fold_batch_norm",
    "mask2former_swin_config",
]
