"""Offset learning plugged into transformers' SegFormer and Mask2Former (tiny configs, CPU)."""

import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import (
    AutoModelForSemanticSegmentation,
    AutoModelForUniversalSegmentation,
    BertConfig,
    BertModel,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    SegformerConfig,
    SegformerForSemanticSegmentation,
    SwinConfig,
)

from offseg_hf.data.synthetic import SyntheticScenes
from offseg_hf.models.modeling_mask2former_offset import Mask2FormerOffsetConfig, Mask2FormerOffsetForUniversalSegmentation
from offseg_hf.models.offset_learning import OffsetLearning
from offseg_hf.models.modeling_segformer_offset import SegformerOffsetConfig, SegformerOffsetForSemanticSegmentation
from offseg_hf.plug import add_offset_learning, offset_learning_overhead

NUM_LABELS = 5
DECODER = 16


def tiny_segformer(**kwargs) -> SegformerForSemanticSegmentation:
    config = SegformerConfig(
        num_labels=NUM_LABELS,
        hidden_sizes=[8, 16, 24, 32],
        num_attention_heads=[1, 1, 2, 2],
        depths=[1, 1, 1, 1],
        decoder_hidden_size=DECODER,
        **kwargs,
    )
    return SegformerForSemanticSegmentation(config).eval()


def tiny_mask2former() -> Mask2FormerForUniversalSegmentation:
    backbone = SwinConfig(
        image_size=64, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=64,
        encoder_layers=1, decoder_layers=3, num_attention_heads=2, dim_feedforward=64, num_queries=6,
        num_labels=4, train_num_points=256,
    )
    return Mask2FormerForUniversalSegmentation(config).eval()


def synthetic_batch(count: int, size: int = 32, num_labels: int = NUM_LABELS, split: str = "train"):
    """`(B, 3, size, size)` normalised images and `(B, size, size)` labels from the synthetic scenes."""
    scenes = SyntheticScenes(num_labels=num_labels, image_size=size, seed=0)
    images, labels = zip(*(scenes.generate(index, split) for index in range(count)))
    pixel_values = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixel_values, torch.from_numpy(np.stack(labels)).long()


def classifier_input(model: SegformerForSemanticSegmentation, pixel_values: torch.Tensor) -> torch.Tensor:
    """The fused decoder feature transformers' SegFormer feeds its 1×1 classifier."""
    captured = {}
    handle = model.decode_head.classifier.register_forward_hook(lambda m, args, out: captured.update(x=args[0]))
    with torch.no_grad():
        model(pixel_values)
    handle.remove()
    return captured["x"]


# ---------------------------------------------------------------- SegFormer


def test_surgery_preserves_everything_before_the_classifier(caplog):
    model = tiny_segformer()
    caplog.set_level(logging.INFO, logger="offseg_hf.plug")
    plugged = add_offset_learning(model)
    assert "-> SegformerOffsetForSemanticSegmentation: classifier" in caplog.text
    assert isinstance(plugged, SegformerOffsetForSemanticSegmentation)
    assert plugged.config.model_type == "segformer_offset"
    assert plugged.config.decode_head_style == "transformers"
    pixel_values = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        before = model(pixel_values, output_hidden_states=True)
        after = plugged(pixel_values, output_hidden_states=True)
        fused = plugged.decode_head.fuse(after.hidden_states)
    for old, new in zip(before.hidden_states, after.hidden_states, strict=True):
        assert torch.equal(old, new)
    assert torch.equal(fused, classifier_input(model, pixel_values))
    assert before.logits.shape == (2, NUM_LABELS, 16, 24)
    assert after.logits.shape == (2, NUM_LABELS, 8, 12)  # 2×2 max-pool: 1/8 resolution


def test_source_model_is_left_untouched():
    model = tiny_segformer()
    state = {key: value.clone() for key, value in model.state_dict().items()}
    plugged = add_offset_learning(model)
    with torch.no_grad():
        for parameter in plugged.parameters():
            parameter.add_(1.0)
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())
    assert hasattr(model.decode_head, "classifier")


def test_pool_size_one_keeps_quarter_resolution():
    plugged = add_offset_learning(tiny_segformer(), pool_size=1).eval()
    with torch.no_grad():
        assert plugged(torch.randn(1, 3, 64, 64)).logits.shape == (1, NUM_LABELS, 16, 16)


def test_parameter_overhead():
    model = tiny_segformer()
    plugged = add_offset_learning(model)
    overhead = offset_learning_overhead(model, plugged)
    c, k = DECODER, NUM_LABELS
    assert overhead.removed == c * k + k  # the 1×1 classifier
    assert overhead.added == k * c + 2 * c * c + 2 * k  # W, two projections, LayerNorm over K
    assert overhead.extra == 2 * c * c + k
    assert overhead.parameters_after - overhead.parameters_before == overhead.extra
    assert f"{overhead.extra:+,}" in str(overhead)
    # SegFormer-B0 on ADE20K (C = 256, K = 150): +131,222 parameters, the paper's "0.1-0.2 M".
    b0 = SegformerForSemanticSegmentation(SegformerConfig(num_labels=150))
    assert offset_learning_overhead(b0, add_offset_learning(b0)).extra == 2 * 256 * 256 + 150


def test_dtype_and_mode_follow_the_source():
    model = tiny_segformer().to(torch.float64).train()
    plugged = add_offset_learning(model)
    assert plugged.training
    assert {p.dtype for p in plugged.parameters()} == {torch.float64}


def test_offset_variant_trains_on_synthetic_scenes():
    plugged = add_offset_learning(tiny_segformer(classifier_dropout_prob=0.0)).train()
    pixel_values, labels = synthetic_batch(4)
    optimizer = torch.optim.AdamW(plugged.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        loss = plugged(pixel_values, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    offsets = plugged.decode_head.offset_learning
    assert offsets.class_embeddings.grad is not None and offsets.feature_offset_proj.weight.grad.abs().sum() > 0
    assert losses[-1] < 0.8 * losses[0], losses


def test_save_and_reload_as_the_offset_variant(tmp_path):
    plugged = add_offset_learning(tiny_segformer()).eval()
    plugged.save_pretrained(tmp_path)
    config_text = (tmp_path / "config.json").read_text()
    assert '"model_type": "segformer_offset"' in config_text
    assert "AutoModelForSemanticSegmentation" in config_text  # auto_map for trust_remote_code users
    # Only the code the model imports travels for trust_remote_code, none of OffSeg's.
    assert sorted(path.name for path in tmp_path.glob("*.py")) == ["loss.py", "modeling_segformer_offset.py", "offset_learning.py", "precision.py"]
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert type(reloaded) is SegformerOffsetForSemanticSegmentation
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values).logits, plugged(pixel_values).logits)


def test_plain_segformer_checkpoint_loads_into_the_offset_class(tmp_path):
    model = tiny_segformer()
    model.save_pretrained(tmp_path)  # Hub layout: decode_head.linear_c.*, encoder.block.*
    plugged = SegformerOffsetForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert plugged.config.model_type == "segformer_offset"
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fused = plugged.decode_head.fuse(plugged(pixel_values, output_hidden_states=True).hidden_states)
    assert torch.equal(fused, classifier_input(model, pixel_values))


def test_reference_style_head_and_config_validation():
    config = SegformerOffsetConfig(
        num_labels=3, hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 2, 2], depths=[1, 1, 1, 1],
        decoder_hidden_size=DECODER, decode_head_style="reference",
    )
    model = SegformerOffsetForSemanticSegmentation(config).eval()
    assert "decode_head.linear_projections.0.batch_norm.running_var" in model.state_dict()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).logits.shape == (1, 3, 8, 8)
    with pytest.raises(StrictDataclassClassValidationError, match="decode_head_style"):
        SegformerOffsetConfig(decode_head_style="mlp")


def test_fresh_init_of_the_new_modules():
    """Transformers skips parameter-less parents: the reference convs and offset projections are initialised anyway."""
    config = SegformerOffsetConfig(
        num_labels=3, hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 2, 2], depths=[1, 1, 1, 1],
        decoder_hidden_size=64, decode_head_style="reference", offset_learning_init_std=0.5,
    )
    head = SegformerOffsetForSemanticSegmentation(config).decode_head
    kaiming_std = (2 / 64) ** 0.5  # fan_out of a 1×1 conv with 64 output channels
    assert abs(head.linear_projections[3].conv.weight.std().item() / kaiming_std - 1) < 0.1
    offsets = head.offset_learning
    for weight in (offsets.class_embeddings, offsets.class_offset_proj.weight, offsets.feature_offset_proj.weight):
        assert 0.4 < weight.std().item() < 0.6
    mask2former = add_offset_learning(tiny_mask2former(), init_std=0.5)
    predictor = mask2former.model.transformer_module.decoder.mask_predictor
    assert 0.4 < predictor.offset_learning.feature_offset_proj.weight.std().item() < 0.6


def test_unsupported_models_are_named():
    with pytest.raises(TypeError, match="BertModel"):
        add_offset_learning(BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                                                 intermediate_size=8, vocab_size=10)))
    plugged = add_offset_learning(tiny_segformer())
    with pytest.raises(ValueError, match="already uses offset learning"):
        add_offset_learning(plugged)


@pytest.mark.slow
def test_saved_folder_loads_as_remote_code_without_offseg_hf(tmp_path):
    add_offset_learning(tiny_segformer()).save_pretrained(tmp_path / "model")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["offseg_hf"] = None  # make the package unimportable
        import torch
        from transformers import AutoModelForSemanticSegmentation
        model = AutoModelForSemanticSegmentation.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        print(type(model).__module__, tuple(model(torch.randn(1, 3, 64, 64)).logits.shape))
        """
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transformers_modules" in result.stdout and f"(1, {NUM_LABELS}, 8, 8)" in result.stdout


# ---------------------------------------------------------------- Mask2Former


@pytest.mark.slow
def test_mask2former_offset_folder_loads_as_remote_code_without_offseg_hf(tmp_path):
    model = add_offset_learning(tiny_mask2former()).eval()
    model.save_pretrained(tmp_path / "model")
    # Only the code the model imports travels, none of OffSeg's.
    assert sorted(p.name for p in (tmp_path / "model").glob("*.py")) == ["modeling_mask2former_offset.py", "offset_learning.py", "precision.py"]
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.save(model(pixel_values).masks_queries_logits, tmp_path / "expected.pt")
    torch.save(pixel_values, tmp_path / "input.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["offseg_hf"] = None  # make the package unimportable
        import torch
        from transformers import AutoModelForUniversalSegmentation
        model = AutoModelForUniversalSegmentation.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            masks = model(torch.load({str(tmp_path / "input.pt")!r}, weights_only=True)).masks_queries_logits
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        print(type(model).__module__, "MAXDIFF", (masks - expected).abs().max().item())
        """
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("transformers_modules")
    assert float(result.stdout.split("MAXDIFF")[1]) <= 1e-5


def test_mask_offset_learning_matches_the_classifier_form():
    """With W = the learned class embeddings, the mask variant + LayerNorm is the classifier form (Eq. 4–13)."""
    torch.manual_seed(3)
    classifier = OffsetLearning(hidden_size=12, num_labels=7)
    torch.nn.init.normal_(classifier.class_embeddings, std=0.5)
    torch.nn.init.normal_(classifier.class_offset_proj.weight, std=0.2)
    torch.nn.init.normal_(classifier.feature_offset_proj.weight, std=0.2)
    masks = OffsetLearning(12)
    masks.load_state_dict(
        {"class_offset_proj.weight": classifier.class_offset_proj.weight,
         "feature_offset_proj.weight": classifier.feature_offset_proj.weight}
    )
    features = torch.randn(2, 12, 5, 6)
    aligned_classes, aligned_pixels = masks.align(features, classifier.class_embeddings.expand(2, -1, -1))
    scores = torch.einsum("bkc,bchw->bhwk", aligned_classes, aligned_pixels)
    expected = classifier(features)
    torch.testing.assert_close(classifier.mask_norm(scores).permute(0, 3, 1, 2), expected, atol=1e-5, rtol=1e-5)


def test_reassociated_masks_equal_the_explicit_product():
    torch.manual_seed(4)
    offsets = OffsetLearning(16)
    torch.nn.init.normal_(offsets.class_offset_proj.weight, std=0.3)
    torch.nn.init.normal_(offsets.feature_offset_proj.weight, std=0.3)
    queries, pixels = torch.randn(2, 6, 16), torch.randn(2, 16, 5, 7)
    explicit = torch.einsum("bqc,bchw->bqhw", *offsets.align(pixels, queries))
    torch.testing.assert_close(offsets.masks(pixels, queries), explicit, atol=1e-4, rtol=1e-4)


def test_mask2former_forward_backward():
    plugged = add_offset_learning(tiny_mask2former()).train()
    assert isinstance(plugged, Mask2FormerOffsetForUniversalSegmentation)
    pixel_values = torch.randn(2, 3, 64, 64)
    mask_labels = [(torch.rand(2, 64, 64) > 0.5).float() for _ in range(2)]
    class_labels = [torch.tensor([0, 3]), torch.tensor([1, 2])]
    outputs = plugged(pixel_values, mask_labels=mask_labels, class_labels=class_labels)
    assert outputs.masks_queries_logits.shape == (2, 6, 16, 16)
    assert outputs.class_queries_logits.shape == (2, 6, 5)
    outputs.loss.backward()
    offsets = plugged.model.transformer_module.decoder.mask_predictor.offset_learning
    assert offsets.class_offset_proj.weight.grad.abs().sum() > 0
    assert offsets.feature_offset_proj.weight.grad.abs().sum() > 0


def test_mask2former_surgery_keeps_pixel_level_module_and_round_trips(tmp_path):
    model = tiny_mask2former()
    plugged = add_offset_learning(model).eval()
    overhead = offset_learning_overhead(model, plugged)
    assert overhead.removed == 0 and overhead.extra == overhead.added == 2 * 32 * 32
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model.model.pixel_level_module(pixel_values)
        after = plugged.model.pixel_level_module(pixel_values)
        assert torch.equal(before.decoder_last_hidden_state, after.decoder_last_hidden_state)
        logits = plugged(pixel_values).masks_queries_logits
    plugged.save_pretrained(tmp_path)
    reloaded = AutoModelForUniversalSegmentation.from_pretrained(tmp_path).eval()
    assert type(reloaded) is Mask2FormerOffsetForUniversalSegmentation
    assert isinstance(reloaded.config, Mask2FormerOffsetConfig)
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values).masks_queries_logits, logits)


def test_benchmark_smoke(tmp_path):
    """benchmarks/plug.py logic on a tiny SegFormer: both variants share init, data and budget."""
    from benchmarks.plug import BenchmarkSettings, run_benchmark

    settings = BenchmarkSettings(
        output_dir=str(tmp_path), steps=2, batch_size=2, image_size=32, num_labels=4, train_samples=8,
        eval_samples=2, warmup_steps=1, latency_size=64, latency_repeats=1,
        segformer=dict(hidden_sizes=[8, 16, 24, 32], num_attention_heads=[1, 1, 2, 2], depths=[1, 1, 1, 1],
                       decoder_hidden_size=16),
    )
    results = run_benchmark(settings)
    plain, offset = results["variants"]["segformer"], results["variants"]["segformer-offset"]
    pool1 = results["variants"]["segformer-offset-pool1"]
    assert plain["steps"] == offset["steps"] == pool1["steps"] == 2
    assert offset["parameters"] - plain["parameters"] == pool1["parameters"] - plain["parameters"] == 2 * 16 * 16 + 4
    assert plain["loss"][0] != offset["loss"][0]  # same batch, different heads
    assert "| segformer-offset |" in (tmp_path / "results.md").read_text()
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "segformer-offset-pool1")
    assert type(reloaded) is SegformerOffsetForSemanticSegmentation
    assert reloaded.config.offset_learning_pool_size == 1
