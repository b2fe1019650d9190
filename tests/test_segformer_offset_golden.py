"""Golden parity: the reference SegFormer-B0 + offset learning (official weights and outputs, 150 classes)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from offseg_hf.conversion.accounting import ConversionError
from offseg_hf.conversion.segformer import (
    convert_segformer_offset_state_dict,
    is_segformer_offset_state_dict,
    segformer_offset_config_from_state_dict,
    segformer_offset_key,
)
from offseg_hf.models.modeling_segformer_offset import SegformerOffsetForSemanticSegmentation

ATOL = 1e-4  # reference runs differ by up to 1.5e-5 between batch-1 and batch-2 evaluation


@pytest.fixture(scope="module")
def official(fixtures_dir):
    return load_file(fixtures_dir / "segformer-b0-offset_official.safetensors")


@pytest.fixture(scope="module")
def golden_io(fixtures_dir):
    return load_file(fixtures_dir / "segformer-b0-offset_io.safetensors")


@pytest.fixture(scope="module")
def converted_model(official):
    config, state_dict = convert_segformer_offset_state_dict(official)
    model = SegformerOffsetForSemanticSegmentation(config).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


def test_every_reference_key_is_accounted_for(fixtures_dir, official):
    keys = [key for key, _ in json.loads((fixtures_dir / "segformer-b0-offset_official_keys.json").read_text())]
    assert sorted(keys) == sorted(official)  # safetensors stores keys sorted
    config, converted = convert_segformer_offset_state_dict(official)
    # conv_seg (weight + bias) dropped; 4 stages x 2 blocks packed q/k/v (weight + bias) split in three.
    packed = [key for key in keys if key.endswith(("in_proj_weight", "in_proj_bias"))]
    assert len(packed) == 16
    assert len(converted) == len(keys) - 2 + 2 * len(packed)
    assert not any("conv_seg" in key or "classifier" in key for key in converted)
    assert converted["decode_head.offset_learning.class_embeddings"].shape == (150, 256)
    torch.testing.assert_close(
        converted["decode_head.offset_learning.class_embeddings"], official["decode_head.offset_learning.cls_repr"][0]
    )


def test_inferred_config_is_mit_b0(official):
    config = segformer_offset_config_from_state_dict(official)
    assert config.hidden_sizes == [32, 64, 160, 256]
    assert config.depths == [2, 2, 2, 2]
    assert config.sr_ratios == [8, 4, 2, 1]
    assert config.patch_sizes == [7, 3, 3, 3]
    assert config.mlp_ratios == [4, 4, 4, 4]
    assert (config.num_labels, config.decoder_hidden_size) == (150, 256)
    assert (config.decode_head_style, config.encoder_layer_norm_eps) == ("reference", 1e-6)
    assert is_segformer_offset_state_dict(official)


def test_parameter_count_matches_reference(converted_model):
    # reference: 3,923,490 including the unused conv_seg (150 x 256 + 150)
    assert sum(p.numel() for p in converted_model.parameters()) == 3_923_490 - (150 * 256 + 150)


def test_logits_and_pooled_feature_match_reference(converted_model, golden_io):
    with torch.no_grad():
        outputs = converted_model(golden_io["pixel_values"], output_hidden_states=True)
        for index, stage in enumerate(outputs.hidden_states):
            torch.testing.assert_close(stage, golden_io[f"backbone.{index}"], atol=2e-5, rtol=1e-4)
        pooled = converted_model.decode_head.pooled(outputs.hidden_states)
        batch2 = converted_model(golden_io["pixel_values_b2"]).logits
    torch.testing.assert_close(pooled, golden_io["head.pooled"], atol=ATOL, rtol=ATOL)
    assert outputs.logits.shape == (1, 150, 32, 40)
    torch.testing.assert_close(outputs.logits, golden_io["logits"], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(batch2, golden_io["logits_b2"], atol=ATOL, rtol=ATOL)


def test_mismatches_are_named(official):
    broken = dict(official)
    broken["decode_head.some_extra.weight"] = torch.zeros(3)
    del broken["decode_head.fusion_conv.bn.running_var"]
    broken["decode_head.offset_learning.mask_norm.weight"] = torch.zeros(7)
    with pytest.raises(ConversionError) as error:
        convert_segformer_offset_state_dict(broken)
    message = str(error.value)
    assert "decode_head.some_extra.weight" in message
    assert "decode_head.batch_norm.running_var" in message
    assert "decode_head.offset_learning.mask_norm.weight" in message
    with pytest.raises(ConversionError, match="not a SegFormer"):
        convert_segformer_offset_state_dict({"backbone.patch_embed.0.weight": torch.zeros(1)})


def test_training_checkpoint_wrapper_and_key_names(official):
    config, converted = convert_segformer_offset_state_dict({"state_dict": official, "meta": {}})
    assert config.num_labels == 150 and len(converted) > 0
    assert segformer_offset_key("decode_head.fusion_conv.conv.weight") == "decode_head.linear_fuse.weight"
    assert (
        segformer_offset_key("backbone.layers.2.1.1.attn.sr.weight")
        == "segformer.stages.2.blocks.1.attention.sequence_reduction.sequence_reduction.weight"
    )
