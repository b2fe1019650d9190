"""Parity with tensors produced by the reference implementation (tests/fixtures, copied from shared/golden)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from offseg_hf import OffSegConfig, OffSegForSemanticSegmentation, OffsetLearning, carafe
from offseg_hf.conversion.accounting import ConversionError
from offseg_hf.conversion.keymaps import convert_official_state_dict, detect_preset, num_labels_of

ATOL = 1e-4


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def official_t(fixtures_dir):
    return load_file(fixtures_dir / "offseg-t_official.safetensors")


@pytest.fixture(scope="module")
def golden_io(fixtures_dir):
    return load_file(fixtures_dir / "offseg-t_io.safetensors")


@pytest.fixture(scope="module")
def golden_model(official_t):
    config = OffSegConfig.from_preset("offseg-t", num_labels=num_labels_of(official_t))
    model = OffSegForSemanticSegmentation(config).eval()
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    model.load_state_dict(convert_official_state_dict(official_t, config, shapes), strict=True)
    return model


def run_with_decoder_taps(model, pixel_values):
    taps = {}
    handle = model.offseg.decoder.align.register_forward_hook(
        lambda module, inputs, output: taps.update(fused=inputs[0], aligned=output)
    )
    try:
        with torch.no_grad():
            outputs = model(pixel_values, output_hidden_states=True)
    finally:
        handle.remove()
    return outputs, taps


def test_full_model_matches_reference(golden_model, golden_io):
    outputs, taps = run_with_decoder_taps(golden_model, golden_io["pixel_values"])
    for level in range(4):
        assert max_diff(outputs.hidden_states[level + 1], golden_io[f"backbone.{level}"]) <= 1e-5
    assert max_diff(taps["fused"], golden_io["decoder.fused"]) <= ATOL
    assert max_diff(taps["aligned"], golden_io["head.aligned"]) <= ATOL
    assert max_diff(outputs.logits, golden_io["logits"]) <= ATOL


def test_full_model_matches_reference_batch_of_two(golden_model, golden_io):
    with torch.no_grad():
        outputs = golden_model(golden_io["pixel_values_b2"], output_hidden_states=True)
    for level in range(4):
        assert max_diff(outputs.hidden_states[level + 1], golden_io[f"backbone.{level}_b2"]) <= 1e-5
    assert max_diff(outputs.logits, golden_io["logits_b2"]) <= ATOL


@pytest.mark.parametrize("prefix", ["", "strong."])
def test_offset_learning_matches_reference(fixtures_dir, prefix):
    data = load_file(fixtures_dir / "offset_learning_io.safetensors")
    state = {key[len(prefix) + len("state.") :]: value for key, value in data.items() if key.startswith(prefix + "state.")}
    module = OffsetLearning(hidden_size=64, num_labels=19).eval()
    module.load_state_dict(
        {
            "class_embeddings": state["cls_repr"][0],
            "class_offset_proj.weight": state["cls_offset_proj.weight"],
            "feature_offset_proj.weight": state["feat_offset_proj.weight"],
            "mask_norm.weight": state["mask_norm.weight"],
            "mask_norm.bias": state["mask_norm.bias"],
        }
    )
    with torch.no_grad():
        output = module(data["input"])
        # Eq. 13 literally: E' = E + ΔE materialised by align(), then the product and the LayerNorm over K.
        aligned_classes, aligned_pixels = module.align(data["input"], module.class_embeddings)
        explicit = module.mask_norm(torch.einsum("bkc,bchw->bhwk", aligned_classes, aligned_pixels)).permute(0, 3, 1, 2)
    assert output.shape == (2, 19, 12, 20)
    assert max_diff(output, data[prefix + "output"]) <= 1e-5
    assert max_diff(explicit, data[prefix + "output"]) <= 1e-5


@pytest.mark.parametrize("prefix", ["", "strong."])
def test_offset_learning_between_given_embeddings_matches_reference_offset_learning_mask(fixtures_dir, prefix):
    """The reference ``Offset_Learning_Mask`` (Mask2Former w/ offset learning) is OffsetLearning without learned W."""
    data = load_file(fixtures_dir / "offset_learning_mask_io.safetensors")
    module = OffsetLearning(hidden_size=64).eval()
    module.load_state_dict(
        {
            "class_offset_proj.weight": data["state.cls_offset_proj.weight"],
            "feature_offset_proj.weight": data["state.feat_offset_proj.weight"],
        }
    )
    with torch.no_grad():
        aligned_classes, aligned_pixels = module.align(data["mask_features"], data[prefix + "mask_embed"])
        masks = module.masks(data["mask_features"], data[prefix + "mask_embed"])
    assert max_diff(aligned_classes, data[prefix + "aligned_cls_repr"]) <= 1e-5
    assert max_diff(aligned_pixels, data[prefix + "aligned_img_feat"]) <= 1e-5
    # mask_pred = Σ_c W'_qc·E'_c reaches |141| in the strong case, so the masks inherit the (asserted) differences
    # of W' and E' scaled by the other factor; the CPU's matmul kernel sets those differences (AVX2 and AVX-512
    # round differently). The masks must agree to that first-order propagation of the differences this run has
    # (|ΔW'|·|E| + |W'|·|ΔE| + |ΔW'|·|ΔE|) plus float32 rounding of the C = 64-term sums (√C·ε·Σ|W'||E|).
    reference_classes, reference_pixels = data[prefix + "aligned_cls_repr"], data[prefix + "aligned_img_feat"]
    delta_classes = (aligned_classes - reference_classes).abs()
    delta_pixels = (aligned_pixels - reference_pixels).abs()
    products = "bqc,bchw->bqhw"
    propagated = (
        torch.einsum(products, delta_classes, reference_pixels.abs())
        + torch.einsum(products, reference_classes.abs(), delta_pixels)
        + torch.einsum(products, delta_classes, delta_pixels)
    )
    rounding = 8 * torch.finfo(torch.float32).eps * torch.einsum(products, reference_classes.abs(), reference_pixels.abs())
    product = torch.einsum(products, aligned_classes, aligned_pixels)
    for name, value in (("product", product), ("masks", masks)):
        excess = (value - data[prefix + "mask_pred"]).abs() - (propagated + rounding + 1e-6)
        assert excess.max() <= 0, f"{name}: {excess.max():.3g} beyond the propagated bound"


@pytest.mark.parametrize("kernel_size,scale,groups", [(3, 1, 1), (5, 2, 1), (3, 2, 2)])
def test_carafe_matches_reference(fixtures_dir, kernel_size, scale, groups):
    data = load_file(fixtures_dir / "carafe_io.safetensors")
    name = f"k{kernel_size}_s{scale}_g{groups}"
    output = carafe(data[f"{name}.input"], data[f"{name}.masks"], kernel_size, scale=scale, groups=groups)
    assert max_diff(output, data[f"{name}.output"]) <= 1e-5


def test_carafe_rejects_mismatched_kernels():
    with pytest.raises(ValueError, match="kernel_size=5, scale=2"):
        carafe(torch.zeros(1, 4, 6, 6), torch.zeros(1, 9, 12, 12), 5, scale=2)


@pytest.mark.parametrize("preset", ["offseg-t", "offseg-b", "offseg-l"])
def test_parameter_counts_match_reference(fixtures_dir, preset):
    stats = json.loads((fixtures_dir / "offseg_official_stats.json").read_text())[preset]
    model = OffSegForSemanticSegmentation(OffSegConfig.from_preset(preset, num_labels=150))
    total = sum(p.numel() for p in model.parameters())
    backbone = sum(p.numel() for p in model.offseg.backbone.parameters())
    assert total == stats["params_total_excl_conv_seg"]
    assert backbone == stats["params_backbone"]
    assert total - backbone == stats["params_decode_head"] - stats["params_conv_seg_unused"]


@pytest.mark.parametrize("preset", ["offseg-t", "offseg-b", "offseg-l"])
def test_official_key_manifests_map_completely(fixtures_dir, preset):
    manifest = json.loads((fixtures_dir / f"{preset}_official_keys.json").read_text())
    generator = torch.Generator().manual_seed(0)
    state_dict = {}
    for key, shape in manifest:
        if key.endswith(("attention_bias_idxs_seg", "init_pos", "hamming_lowpass", "hamming_highpass")):
            continue  # derived buffers: checked against real values in the test below
        state_dict[key] = torch.randn(shape, generator=generator) if shape else torch.tensor(0)
    assert detect_preset(state_dict) == preset
    config = OffSegConfig.from_preset(preset, num_labels=num_labels_of(state_dict))
    model = OffSegForSemanticSegmentation(config)
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    converted = convert_official_state_dict(state_dict, config, shapes)
    assert set(converted) == set(shapes)
    dropped = [key for key, _ in manifest if key.startswith("decode_head.conv_seg")]
    assert dropped == ["decode_head.conv_seg.weight", "decode_head.conv_seg.bias"]


def test_derived_buffers_agree_with_reference(official_t):
    derived = [key for key in official_t if key.endswith(("attention_bias_idxs_seg", "init_pos", "hamming_lowpass"))]
    assert len(derived) == 5 + 3 + 3
    config = OffSegConfig.from_preset("offseg-t", num_labels=150)
    convert_official_state_dict(official_t, config)  # raises if any derived buffer disagrees

    tampered = dict(official_t)
    key = "backbone.network.6.4.token_mixer.attention_bias_idxs_seg"
    tampered[key] = tampered[key].flip(0)
    with pytest.raises(ConversionError, match="network.6.4.token_mixer.attention_bias_idxs_seg"):
        convert_official_state_dict(tampered, config)


def test_mapping_names_missing_unexpected_and_misshaped_keys(official_t, golden_model):
    config = golden_model.config
    shapes = {key: value.shape for key, value in golden_model.state_dict().items()}
    broken = dict(official_t)
    del broken["decode_head.align.gn.weight"]
    broken["decode_head.extra_head.weight"] = torch.zeros(3)
    broken["decode_head.pre.2.conv.weight"] = torch.zeros(65, 120, 1, 1)
    with pytest.raises(ConversionError) as error:
        convert_official_state_dict(broken, config, shapes)
    message = str(error.value)
    assert "missing key 'offseg.decoder.align.norm.weight'" in message
    assert "unexpected key 'decode_head.extra_head.weight'" in message
    # the misshaped tensor by its name in the file, its shape and ours, and the parameter it maps to
    assert "wrong shape for 'decode_head.pre.2.conv.weight': checkpoint (65, 120, 1, 1), model (64, 120, 1, 1)" in message
    assert "(→ 'offseg.decoder.stage_projections.2.conv.weight')" in message


def test_detect_preset_rejects_other_architectures():
    with pytest.raises(ConversionError, match="not an OffSeg checkpoint"):
        detect_preset({"backbone.layers.0.weight": torch.zeros(1)})


@pytest.mark.parametrize("scale,groups", [(1, 1), (2, 2)])
def test_carafe_gradients(scale, groups):
    features = torch.randn(1, 4, 3, 4, dtype=torch.float64, requires_grad=True)
    kernels = torch.randn(1, groups * 9, 3 * scale, 4 * scale, dtype=torch.float64).softmax(1).requires_grad_()
    assert torch.autograd.gradcheck(lambda f, k: carafe(f, k, 3, scale=scale, groups=groups), (features, kernels))
