"""Transformers-style model tests for OffSeg, EfficientFormerV2 and SegFormer + offset learning (tiny configs).

What Transformers' common suites check for SegFormer, checked here for this package's classes with
:class:`tests.model_tester.ModelTester`; plus the backbone contract (``out_features``, ``channels``, any
Transformers backbone under the OffSeg decoder), binary segmentation, the per-pixel baseline and export.
"""

from __future__ import annotations

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoBackbone, AutoModelForSemanticSegmentation, ResNetConfig

from model_tester import ModelTester, in_own_memory
from offseg_hf import (
    EfficientFormerV2Backbone,
    EfficientFormerV2Config,
    OffSegConfig,
    OffSegForSemanticSegmentation,
    OffSegModel,
    SegformerOffsetConfig,
    SegformerOffsetForSemanticSegmentation,
)

pytestmark = pytest.mark.torch_threads(1)

FOUR_STAGES = ["stage1", "stage2", "stage3", "stage4"]


def tiny_backbone_config(**kwargs) -> EfficientFormerV2Config:
    """Two attention blocks (stages 3 and 4) + the downsampling attention, on a 64-pixel bias layout."""
    defaults = dict(
        hidden_sizes=[16, 16, 32, 32], depths=[1, 1, 2, 2], num_attention_blocks=[0, 0, 1, 1],
        mlp_expansion_ratios=[[2], [2], [2, 2], [2, 2]], key_dim=8, num_attention_heads=2, downsample_key_dim=8,
        downsample_num_attention_heads=2, attention_bias_resolution=64, out_features=FOUR_STAGES,
    )
    return EfficientFormerV2Config(**{**defaults, **kwargs})


def tiny_offseg_config(**kwargs) -> OffSegConfig:
    defaults = dict(
        backbone_config=tiny_backbone_config(), decoder_stage_channels=[16, 16, 16, 16], decoder_hidden_size=32,
        decoder_num_groups=8, num_labels=5,
    )
    return OffSegConfig(**{**defaults, **kwargs})


# Input 64×96: stem/stage1 16×24, stage2 8×12, stage3 4×6 (its attention runs on 2×3), stage4 2×3.
HIDDEN_SHAPES = [(2, 16, 16, 24), (2, 16, 16, 24), (2, 16, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3)]
ATTENTION_SHAPES = [(2, 2, 6, 6), (2, 2, 6, 24), (2, 2, 6, 6)]  # stage 3, downsampling (6 queries, 24 keys), stage 4

OFFSEG = ModelTester(OffSegForSemanticSegmentation, tiny_offseg_config())
OFFSEG_PER_PIXEL = ModelTester(OffSegForSemanticSegmentation, tiny_offseg_config(classifier="per_pixel"))
BACKBONE = ModelTester(EfficientFormerV2Backbone, tiny_backbone_config(), output_key="feature_maps", has_labels=False)


def tiny_segformer_offset_config(**kwargs) -> SegformerOffsetConfig:
    defaults = dict(
        num_channels=3, num_encoder_blocks=4, depths=[1, 1, 1, 1], sr_ratios=[8, 4, 2, 1], hidden_sizes=[8, 16, 16, 32],
        num_attention_heads=[1, 1, 2, 2], decoder_hidden_size=16, num_labels=5,
        drop_path_rate=0.0, classifier_dropout_prob=0.0,  # deterministic training steps (gradient checkpointing)
    )
    return SegformerOffsetConfig(**{**defaults, **kwargs})


SEGFORMER_OFFSET = ModelTester(SegformerOffsetForSemanticSegmentation, tiny_segformer_offset_config())
CLASSIFIERS = [OFFSEG, OFFSEG_PER_PIXEL, SEGFORMER_OFFSET]
ALL = CLASSIFIERS + [BACKBONE]
ids = lambda testers: [f"{t.model_class.__name__}-{getattr(t.config, 'classifier', '')}" for t in testers]  # noqa: E731


@pytest.mark.parametrize("tester", ALL, ids=ids(ALL))
def test_config_round_trip(tester, tmp_path):
    tester.check_config_round_trip(tmp_path)


@pytest.mark.parametrize("tester", ALL, ids=ids(ALL))
def test_save_load(tester, tmp_path):
    tester.check_save_load(tmp_path)


@pytest.mark.parametrize("tester", ALL, ids=ids(ALL))
def test_missing_weights_are_initialised(tester, tmp_path):
    tester.check_missing_weights_are_initialised(tmp_path)


@pytest.mark.parametrize("tester", ALL, ids=ids(ALL))
def test_batching_equivalence(tester):
    tester.check_batching_equivalence()


@pytest.mark.parametrize("tester", CLASSIFIERS, ids=ids(CLASSIFIERS))
def test_training_step_reaches_every_parameter(tester):
    tester.check_training_step()


@pytest.mark.parametrize("tester", CLASSIFIERS, ids=ids(CLASSIFIERS))
def test_gradient_checkpointing_gives_the_same_step(tester):
    tester.check_gradient_checkpointing()


@pytest.mark.parametrize("tester", [OFFSEG, SEGFORMER_OFFSET], ids=ids([OFFSEG, SEGFORMER_OFFSET]))
def test_eager_and_sdpa_attention_agree(tester):
    tester.check_eager_equals_sdpa()


@pytest.mark.parametrize("tester", [OFFSEG, OFFSEG_PER_PIXEL, BACKBONE], ids=ids([OFFSEG, OFFSEG_PER_PIXEL, BACKBONE]))
def test_hidden_states_through_output_capturing(tester):
    tester.check_hidden_states(HIDDEN_SHAPES)


@pytest.mark.parametrize("tester", [OFFSEG, BACKBONE], ids=ids([OFFSEG, BACKBONE]))
def test_attentions_through_output_capturing(tester):
    tester.check_attentions(ATTENTION_SHAPES)


def test_segformer_offset_hidden_states_and_attentions():
    # MiT stages at 64×96: 16×24, 8×12, 4×6, 2×3; attention keys reduced by sr_ratios 8, 4, 2, 1.
    SEGFORMER_OFFSET.check_hidden_states([(2, 8, 16, 24), (2, 16, 8, 12), (2, 16, 4, 6), (2, 32, 2, 3)])
    SEGFORMER_OFFSET.check_attentions([(2, 1, 384, 6), (2, 1, 96, 6), (2, 2, 24, 6), (2, 2, 6, 6)])


@pytest.mark.parametrize("tester", [OFFSEG, BACKBONE], ids=ids([OFFSEG, BACKBONE]))
def test_tuple_output(tester):
    tester.check_tuple_output()


def test_offseg_export_static_and_dynamic_sizes():
    """Dynamic H and W (multiples of 32) export once and match eager at two sizes the trace never saw."""
    OFFSEG.check_export(dynamic_sizes=[(128, 64), (96, 160)])


def test_segformer_offset_export_static():
    SEGFORMER_OFFSET.check_export()


# ------------------------------------------------------------------ backbone contract


def test_backbone_config_selects_the_last_stage_by_default():
    assert EfficientFormerV2Config().out_features == ["stage4"]
    assert OffSegConfig().backbone_config.out_features == FOUR_STAGES
    assert OffSegConfig.from_preset("offseg-t").backbone_config.out_features == FOUR_STAGES


def test_backbone_out_features_and_channels():
    config = tiny_backbone_config(out_features=["stem", "stage2", "stage4"], out_indices=None)
    backbone = AutoBackbone.from_config(config).eval()
    assert isinstance(backbone, EfficientFormerV2Backbone)
    assert backbone.channels == [16, 16, 32]
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 64, 96)).feature_maps
    assert [tuple(m.shape) for m in maps] == [(1, 16, 16, 24), (1, 16, 8, 12), (1, 32, 2, 3)]
    assert tiny_backbone_config(out_features=None, out_indices=[2, 3]).out_features == ["stage2", "stage3"]


def test_decoder_takes_any_transformers_backbone(tmp_path):
    """A tiny ResNet (four maps, strides 4…32) under the OffSeg decoder, built through load_backbone."""
    backbone_config = ResNetConfig(
        embedding_size=8, hidden_sizes=[16, 16, 32, 32], depths=[1, 1, 1, 1], layer_type="basic", out_features=FOUR_STAGES
    )
    config = tiny_offseg_config(backbone_config=backbone_config)
    torch.manual_seed(0)
    model = OffSegForSemanticSegmentation(config).eval()
    assert type(model.offseg.backbone).__name__ == "ResNetBackbone"
    pixel_values = torch.randn(1, 3, 70, 100)
    with torch.no_grad():
        logits = model(pixel_values).logits
    assert logits.shape == (1, 5, 18, 25)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert reloaded.config.backbone_config.model_type == "resnet"
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values).logits, logits)


CONFIG_ERRORS = (ValueError, StrictDataclassClassValidationError)  # the latter wraps validate_architecture's ValueError


def test_backbone_with_wrong_number_of_maps_is_refused():
    with pytest.raises(CONFIG_ERRORS, match="returns 1 feature maps"):
        tiny_offseg_config(backbone_config=tiny_backbone_config(out_features=["stage4"]))


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"num_labels": 1}, "use num_labels=2"),
        ({"classifier": "mlp"}, "classifier must be one of"),
        ({"decoder_stage_channels": [16, 16, 16, 18], "decoder_num_groups": 2}, "not divisible by freqfusion_resample_groups"),
        ({"decoder_stage_channels": [8, 8, 8, 8], "decoder_num_groups": 8}, "compresses to 4"),
        ({"freqfusion_sampler_kernel": 4}, "must be odd"),
    ],
)
def test_config_refuses_inconsistent_architectures(overrides, message):
    with pytest.raises(CONFIG_ERRORS, match=message):
        tiny_offseg_config(**overrides)


def test_segformer_offset_refuses_one_label():
    with pytest.raises(CONFIG_ERRORS, match="use num_labels=2"):
        tiny_segformer_offset_config(num_labels=1)


# ------------------------------------------------------------------ binary segmentation, per-pixel baseline


def test_binary_model_learns_foreground_background():
    """num_labels=2 (background, foreground) on squares of a shifted-intensity texture: the foreground IoU rises."""
    generator = torch.Generator().manual_seed(0)
    images, masks = [], []
    for _ in range(8):
        mask = torch.zeros(64, 64, dtype=torch.long)
        top, left = torch.randint(0, 32, (2,), generator=generator).tolist()
        mask[top : top + 28, left : left + 28] = 1
        image = torch.randn(3, 64, 64, generator=generator) * 0.3 + mask.float() * 1.5
        images.append(image)
        masks.append(mask)
    images, masks = torch.stack(images), torch.stack(masks)
    torch.manual_seed(0)
    model = OffSegForSemanticSegmentation(tiny_offseg_config(num_labels=2)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def foreground_iou():
        model.eval()
        with torch.no_grad():
            logits = torch.nn.functional.interpolate(model(images).logits, size=(64, 64), mode="bilinear")
        model.train()
        predicted = logits.argmax(1) == 1
        truth = masks == 1
        return ((predicted & truth).sum() / (predicted | truth).sum().clamp_min(1)).item()

    before = foreground_iou()
    losses = []
    for _ in range(40):
        loss = model(images, labels=masks).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert foreground_iou() > max(0.8, before + 0.2)


def test_per_pixel_model_saves_and_reloads_as_itself(tmp_path):
    model = OFFSEG_PER_PIXEL.make_model().eval()
    assert not hasattr(model, "offset_learning") and tuple(model.classifier.weight.shape) == (5, 32, 1, 1)
    model.save_pretrained(tmp_path)
    reloaded = in_own_memory(AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval())  # bit-exact below
    assert reloaded.config.classifier == "per_pixel"
    pixel_values = OFFSEG_PER_PIXEL.inputs()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values).logits, model(pixel_values).logits)


def test_base_model_has_no_classifier():
    model = OffSegModel(tiny_offseg_config()).eval()
    with torch.no_grad():
        features = model(torch.randn(1, 3, 64, 96)).last_hidden_state
    assert features.shape == (1, 32, 16, 24)
    assert not any("offset_learning" in name or "classifier" in name for name, _ in model.named_parameters())
