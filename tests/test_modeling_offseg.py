"""Transformers-style model tests: shapes, outputs, save/load, loss, gradients, dtypes, Auto classes."""

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoBackbone, AutoConfig, AutoModel, AutoModelForSemanticSegmentation

from offseg_hf import (
    EfficientFormerV2Backbone,
    EfficientFormerV2Config,
    OffSegConfig,
    OffSegForSemanticSegmentation,
    OffSegFreqFusion,
    OffSegModel,
    OffsetLearning,
)
from offseg_hf.models.modeling_efficientformer_v2 import EfficientFormerV2RelativePositionBias

NUM_LABELS = 7


def small_config(**kwargs) -> OffSegConfig:
    """OffSeg-T architecture with few classes (the smallest preset, ~6 M parameters)."""
    return OffSegConfig.from_preset("offseg-t", num_labels=NUM_LABELS, **kwargs)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return OffSegForSemanticSegmentation(small_config()).eval()


@pytest.mark.parametrize("height,width", [(97, 131), (64, 64), (33, 1), (200, 50)])
def test_logits_are_quarter_resolution_for_any_size(model, height, width):
    with torch.no_grad():
        logits = model(torch.randn(1, 3, height, width)).logits
    assert logits.shape == (1, NUM_LABELS, math.ceil(height / 4), math.ceil(width / 4))
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_hidden_states_and_tuple_output(model):
    pixel_values = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        outputs = model(pixel_values, output_hidden_states=True)
        no_hidden = model(pixel_values)
        as_tuple = model(pixel_values, return_dict=False)
    widths = [32, 32, 48, 120, 224]
    strides = [4, 4, 8, 16, 32]
    assert len(outputs.hidden_states) == 5
    for state, width, stride in zip(outputs.hidden_states, widths, strides):
        assert state.shape == (2, width, 96 // stride, 128 // stride)
    assert no_hidden.hidden_states is None
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], outputs.logits)


def test_base_model_returns_aligned_features(model):
    with torch.no_grad():
        features = model.offseg(torch.randn(1, 3, 70, 90)).last_hidden_state
        logits = model(torch.randn(1, 3, 70, 90)).logits
    assert features.shape == (1, 256, 18, 23)
    assert logits.shape[-2:] == features.shape[-2:]


def test_batch_equals_single_images(model):
    pixel_values = torch.randn(3, 3, 64, 96)
    with torch.no_grad():
        batched = model(pixel_values).logits
        single = torch.cat([model(pixel_values[i : i + 1]).logits for i in range(3)])
    assert (batched - single).abs().max().item() <= 1e-4


def test_eval_is_deterministic(model):
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(pixel_values).logits, model(pixel_values).logits)


def test_loss_is_cross_entropy_ignoring_255(model):
    pixel_values = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, NUM_LABELS, (2, 64, 64))
    labels[:, :20] = 255
    with torch.no_grad():
        outputs = model(pixel_values, labels=labels)
        upsampled = F.interpolate(outputs.logits, size=(64, 64), mode="bilinear", align_corners=False)
        expected = F.cross_entropy(upsampled, labels, ignore_index=255)
        # Changing the label of ignored pixels must not change the loss.
        relabelled = labels.clone()
        relabelled[:, :20] = 255
        assert torch.allclose(outputs.loss, expected)
        assert torch.allclose(model(pixel_values, labels=relabelled).loss, outputs.loss)
        all_ignored = torch.full_like(labels, 255)
        assert torch.isnan(model(pixel_values, labels=all_ignored).loss)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = OffSegForSemanticSegmentation(small_config()).train()
    # 128×128: at smaller sizes the stride-32 map is 2×2 and its dilation-2 neighbours are all outside the image,
    # so the resampler's similarity input (and hence its offset weights' gradient) is zero.
    loss = model(torch.randn(2, 3, 128, 128), labels=torch.randint(0, NUM_LABELS, (2, 128, 128))).loss
    loss.backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert dead == []


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.randint(0, NUM_LABELS, (2, 64, 64))
    reference = OffSegForSemanticSegmentation(small_config()).train()
    checkpointed = OffSegForSemanticSegmentation(small_config()).train()
    checkpointed.load_state_dict(reference.state_dict())
    checkpointed.gradient_checkpointing_enable()
    assert checkpointed.is_gradient_checkpointing
    reference(pixel_values, labels=labels).loss.backward()
    checkpointed(pixel_values, labels=labels).loss.backward()
    reference_grads = dict(reference.named_parameters())
    for name, param in checkpointed.named_parameters():
        assert torch.allclose(param.grad, reference_grads[name].grad, atol=1e-6), name


def test_save_and_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "offseg" and saved["backbone_config"]["model_type"] == "offseg_efficientformer_v2"
    for loader in (OffSegForSemanticSegmentation, AutoModelForSemanticSegmentation):
        reloaded = loader.from_pretrained(tmp_path).eval()
        assert isinstance(reloaded, OffSegForSemanticSegmentation)
        pixel_values = torch.randn(1, 3, 64, 96)
        with torch.no_grad():
            # Two module instances may pick different oneDNN kernels: equal up to float rounding.
            assert (reloaded(pixel_values).logits - model(pixel_values).logits).abs().max().item() <= 1e-5
    assert AutoConfig.from_pretrained(tmp_path).backbone_config.hidden_sizes == [32, 48, 120, 224]


def test_auto_classes_from_config():
    config = small_config()
    assert isinstance(AutoModelForSemanticSegmentation.from_config(config), OffSegForSemanticSegmentation)
    assert isinstance(AutoModel.from_config(config), OffSegModel)
    backbone = AutoBackbone.from_config(EfficientFormerV2Config.from_variant("s0", out_features=["stage2", "stage4"]))
    assert isinstance(backbone, EfficientFormerV2Backbone)
    with torch.no_grad():
        maps = backbone.eval()(torch.randn(1, 3, 64, 64)).feature_maps
    assert [tuple(m.shape) for m in maps] == [(1, 48, 8, 8), (1, 176, 2, 2)]
    assert backbone.channels == [48, 176]


def test_backbone_rejects_sizes_not_divisible_by_32():
    backbone = EfficientFormerV2Backbone(EfficientFormerV2Config.from_variant("s0")).eval()
    with pytest.raises(ValueError, match="divisible by 32, got 50×64"):
        backbone(torch.randn(1, 3, 50, 64))


def test_wrong_channel_count_is_reported(model):
    with pytest.raises(ValueError, match="has 1 channels, the model expects 3"):
        model(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward(dtype):
    torch.manual_seed(0)
    model = OffSegForSemanticSegmentation(small_config()).eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        reference = model(pixel_values).logits
        half = model.to(dtype)(pixel_values.to(dtype)).logits
    assert half.dtype == dtype and half.shape == reference.shape
    assert torch.isfinite(half).all()
    # Close to float32 (logits are LayerNorm-ed, so of unit scale): float16 0.005, bfloat16 0.02 measured.
    assert (half.float() - reference).abs().mean().item() < 0.05


def test_attention_biases_loaded_after_eval_take_effect():
    """The reference caches the gathered bias table at .eval(), so weights loaded afterwards are silently stale."""
    torch.manual_seed(0)
    model = OffSegForSemanticSegmentation(small_config()).eval()
    pixel_values = torch.randn(1, 3, 96, 64)  # not 512: the bias tables are resized
    with torch.no_grad():
        before = model(pixel_values).logits
        state = model.state_dict()
        for key in state:
            if key.endswith("relative_position.attention_biases"):
                state[key] = torch.randn_like(state[key])
        model.load_state_dict(state)
        after = model(pixel_values).logits
        fresh = OffSegForSemanticSegmentation(small_config()).eval()
        fresh.load_state_dict(state)
        assert not torch.allclose(before, after)
        assert torch.equal(after, fresh(pixel_values).logits)
        doubled = model.double()(pixel_values.double()).logits
    assert doubled.dtype == torch.float64
    assert (doubled.float() - after).abs().max().item() < 1e-3


def test_relative_position_bias_is_resized_bicubically():
    bias = EfficientFormerV2RelativePositionBias(num_heads=2, query_grid=4, key_grid=4)
    torch.nn.init.normal_(bias.attention_biases)
    table = bias.attention_biases[:, bias.attention_bias_idxs]
    assert torch.equal(bias(16, 16, torch.float32)[0], table)  # identity at the layout resolution
    expected = F.interpolate(table[None], size=(6, 6), mode="bicubic", align_corners=False)
    assert torch.equal(bias(6, 6, torch.float32), expected)


def test_reference_initialisation():
    torch.manual_seed(0)
    model = OffSegForSemanticSegmentation(OffSegConfig.from_preset("offseg-t", num_labels=150))
    fusion = model.offseg.decoder.fusions[0]
    assert isinstance(fusion, OffSegFreqFusion)
    assert 0.0005 < fusion.lowpass_encoder.weight.std().item() < 0.002
    assert fusion.lowpass_encoder.bias.abs().max().item() == 0
    bound = math.sqrt(6 / (48 + 64))  # Xavier-uniform bound of the 64 -> 48 compressor
    assert fusion.hr_channel_compressor.weight.abs().max().item() <= bound
    assert fusion.hr_channel_compressor.weight.std().item() > 0.5 * bound / math.sqrt(3)
    head = model.offset_learning
    assert isinstance(head, OffsetLearning)
    assert 0.015 < head.class_embeddings.std().item() < 0.025
    assert torch.equal(head.mask_norm.weight, torch.ones(150))
    block = model.offseg.backbone.stages[3].blocks[-1]
    assert torch.all(block.layer_scale_1 == 1e-5) and torch.all(block.layer_scale_2 == 1e-5)
    assert block.attention.relative_position.attention_biases.abs().max().item() == 0
    assert 0.015 < block.mlp.fc1.weight.std().item() < 0.025
    assert block.mlp.fc1.bias.abs().max().item() == 0
    align = model.offseg.decoder.align.conv.weight  # Kaiming normal, fan_out = 256 -> std sqrt(2 / 256)
    assert 0.8 * math.sqrt(2 / 256) < align.std().item() < 1.2 * math.sqrt(2 / 256)


def test_dropout_is_training_only():
    torch.manual_seed(0)
    model = OffSegForSemanticSegmentation(small_config(classifier_dropout_prob=0.5))
    pixel_values = torch.randn(1, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(pixel_values).logits, model(pixel_values).logits)


def test_remote_code_loads_without_the_package(model, tmp_path):
    model.save_pretrained(tmp_path)
    pixel_values = torch.randn(1, 3, 64, 64)
    torch.save(pixel_values, tmp_path / "input.pt")
    with torch.no_grad():
        torch.save(model(pixel_values).logits, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["offseg_hf"] = None  # hide the installed package: `import offseg_hf` now fails
        import torch
        from transformers import AutoModelForSemanticSegmentation
        try:
            import offseg_hf
        except ImportError:
            pass
        else:
            raise SystemExit("offseg_hf is still importable")
        model = AutoModelForSemanticSegmentation.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            logits = model(torch.load({str(tmp_path / "input.pt")!r}, weights_only=True)).logits
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        print("MAXDIFF", (logits - expected).abs().max().item())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={"HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split("MAXDIFF")[1]) <= 1e-5  # a fresh process may pick other oneDNN kernels
