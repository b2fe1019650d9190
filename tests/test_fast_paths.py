"""The fast formulations (issue 14) against the direct ones they replace: forward and gradients.

The direct formulations are written here as the oracle: CARAFE as a loop of k² shifted multiply-adds, the
neighbour similarity as eight shifted dot products. The golden tests compare the model with the reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from offseg_hf import OffSegForSemanticSegmentation, carafe, fold_batch_norm
from offseg_hf.models.modeling_efficientformer_v2 import (
    EfficientFormerV2Mlp,
    EfficientFormerV2TalkingHead,
    pointwise_conv,
    upsample_bilinear_2x,
)
from offseg_hf.models.modeling_offseg import carafe_by_gather, grid_sample_by_gather, neighbour_cosine_similarity
from test_modeling_common import tiny_offseg_config


def carafe_by_taps(features, kernels, kernel_size, scale=1, groups=1):
    batch, channels, height, width = features.shape
    radius = kernel_size // 2
    padded = F.pad(features, [radius] * 4)
    kernels = kernels.view(batch, groups, kernel_size**2, height * scale, width * scale)
    output = 0
    for tap in range(kernel_size**2):
        row, col = divmod(tap, kernel_size)
        neighbour = padded[:, :, row : row + height, col : col + width]
        neighbour = neighbour.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        weight = kernels[:, :, tap].repeat_interleave(channels // groups, 1)
        output = output + neighbour * weight
    return output


def similarity_by_shifts(features, dilation=2):
    height, width = features.shape[-2:]
    padded = F.pad(features, [dilation] * 4)
    norms = features.norm(dim=1)
    out = []
    for row in range(3):
        for col in range(3):
            if (row, col) != (1, 1):
                neighbour = padded[:, :, row * dilation : row * dilation + height, col * dilation : col * dilation + width]
                out.append((features * neighbour).sum(1) / (norms * neighbour.norm(dim=1)).clamp_min(1e-8))
    return torch.stack(out, 1)


@pytest.mark.parametrize(
    "batch,channels,size,kernel_size,scale,groups",
    [
        (2, 6, (5, 7), 3, 1, 1),
        (2, 8, (4, 6), 3, 1, 2),
        (2, 8, (4, 6), 5, 2, 2),
        (1, 5, (3, 3), 5, 2, 1),
        (3, 4, (6, 2), 3, 2, 4),
        (1, 2, (1, 1), 5, 1, 1),
    ],
)
def test_carafe_matches_tap_loop_forward_and_gradients(batch, channels, size, kernel_size, scale, groups):
    generator = torch.Generator().manual_seed(0)
    height, width = size
    features = torch.randn(batch, channels, height, width, dtype=torch.float64, generator=generator, requires_grad=True)
    kernels = torch.randn(
        batch, groups * kernel_size**2, height * scale, width * scale, dtype=torch.float64, generator=generator
    ).requires_grad_()
    expected = carafe_by_taps(features, kernels, kernel_size, scale, groups)
    output = carafe(features, kernels, kernel_size, scale, groups)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-12)
    upstream = torch.randn(expected.shape, dtype=torch.float64, generator=generator)
    expected_grads = torch.autograd.grad(expected, (features, kernels), upstream)
    grads = torch.autograd.grad(output, (features, kernels), upstream)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "batch,channels,size,kernel_size,scale,groups",
    [(2, 6, (5, 7), 3, 1, 1), (2, 8, (4, 6), 5, 2, 2), (3, 4, (6, 2), 3, 2, 4), (1, 2, (1, 1), 5, 1, 1)],
)
def test_exported_carafe_form_matches_tap_loop(batch, channels, size, kernel_size, scale, groups):
    """The gather + matrix-product form ``torch.export`` / ONNX take, against the tap loop in float64."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(batch, channels, *size, dtype=torch.float64, generator=generator)
    kernels = torch.randn(batch, groups * kernel_size**2, size[0] * scale, size[1] * scale, dtype=torch.float64,
                          generator=generator)
    expected = carafe_by_taps(features, kernels, kernel_size, scale, groups)
    torch.testing.assert_close(carafe_by_gather(features, kernels, kernel_size, scale, groups), expected,
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("size, out_size", [((7, 9), (14, 18)), ((1, 1), (2, 2)), ((4, 3), (5, 11))])
def test_exported_grid_sample_form_matches_grid_sample(size, out_size):
    """The four-gather bilinear form of the resampler's ``grid_sample`` (border padding, align_corners=False)
    against ``F.grid_sample`` in float64: points inside, on the outer edges, exactly at the last pixel centre
    and far outside (clamped to the border)."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(3, 5, *size, dtype=torch.float64, generator=generator)
    grid = torch.rand(3, *out_size, 2, dtype=torch.float64, generator=generator) * 3 - 1.5
    grid[0, 0, 0] = torch.tensor([1.0, 1.0])
    grid[0, 0, 1] = torch.tensor([-1.0, 1.0])
    grid[1, 0, 0] = torch.tensor([1 - 1 / size[1], 1 - 1 / size[0]])  # the last pixel's centre
    expected = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)
    torch.testing.assert_close(grid_sample_by_gather(features, grid), expected, rtol=0, atol=1e-12)


def test_carafe_gradient_of_features_only():
    features = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    kernels = torch.randn(1, 9, 8, 8, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: carafe(f, kernels, 3, scale=2), (features,))


@pytest.mark.parametrize("size", [(6, 9), (2, 2)])
def test_neighbour_similarity_matches_shifted_dot_products(size):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 5, *size, dtype=torch.float64, generator=generator)
    features[0, :, 0, 0] = 0  # a zero vector: similarity 0, no NaN
    features.requires_grad_()
    expected = similarity_by_shifts(features)
    output = neighbour_cosine_similarity(features)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-12)
    upstream = torch.randn(expected.shape, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(
        torch.autograd.grad(output, features, upstream)[0], torch.autograd.grad(expected, features, upstream)[0],
        rtol=1e-12, atol=1e-12,  # relative: the gradient at the zero vector is ~1e8 (divided by the 1e-8 guard)
    )


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 1, 1), (1, 2, 16, 16)])
def test_bilinear_2x_upsampling_matches_interpolate(shape):
    """The transposed-convolution form of the stage-3 attention's upsampling against ``F.interpolate`` in float64:
    values and gradients (borders included: a 1×1 map replicates)."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(shape, dtype=torch.float64, generator=generator, requires_grad=True)
    expected = F.interpolate(features, scale_factor=2, mode="bilinear", align_corners=False)
    output = upsample_bilinear_2x(features)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-12)
    upstream = torch.randn(expected.shape, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(
        torch.autograd.grad(output, features, upstream)[0], torch.autograd.grad(expected, features, upstream)[0],
        rtol=0, atol=1e-12,
    )
    float32 = features.detach().float()
    difference = upsample_bilinear_2x(float32) - F.interpolate(float32, scale_factor=2, mode="bilinear")
    assert difference.abs().max() <= 1e-6  # float32: float rounding only


def test_talking_head_is_a_1x1_convolution_across_heads():
    generator = torch.Generator().manual_seed(0)
    head = EfficientFormerV2TalkingHead(4).double()
    attention = torch.randn(3, 4, 6, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    expected = F.conv2d(attention, head.weight, head.bias)
    output = head(attention)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-12)
    upstream = torch.randn(expected.shape, dtype=torch.float64, generator=generator)
    inputs = (attention, head.weight, head.bias)
    for grad, expected_grad in zip(torch.autograd.grad(output, inputs, upstream), torch.autograd.grad(expected, inputs, upstream)):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("output_channels_last", [False, True])
def test_pointwise_conv_is_a_1x1_convolution(bias, channels_last, output_channels_last):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 5, 4, 6, dtype=torch.float64, generator=generator)
    if channels_last:
        features = features.contiguous(memory_format=torch.channels_last)
    features.requires_grad_()
    weight = torch.randn(3, 5, 1, 1, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, generator=generator, requires_grad=True) if bias else None
    expected = F.conv2d(features, weight, bias)
    output = pointwise_conv(features, weight, bias, channels_last=output_channels_last)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-12)
    layout = torch.channels_last if output_channels_last else torch.contiguous_format
    assert output.is_contiguous(memory_format=layout)
    upstream = torch.randn(expected.shape, dtype=torch.float64, generator=generator)
    inputs = [t for t in (features, weight, bias) if t is not None]
    for grad, expected_grad in zip(torch.autograd.grad(output, inputs, upstream), torch.autograd.grad(expected, inputs, upstream)):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)


def test_mlp_inference_with_a_channels_last_hidden_map_computes_the_training_function():
    """For inference the MLP keeps its hidden map channels-last between fc1 and fc2 (activated through the
    (B, H, W, C) view); with autograd recording it stays NCHW. Both compute the same function, and the NCHW path's
    gradients are those of the plain convolutions."""
    torch.manual_seed(0)
    config = tiny_offseg_config().backbone_config
    mlp = EfficientFormerV2Mlp(config, 6, 16).double().eval()
    for norm in (mlp.norm1, mlp.depthwise_norm, mlp.norm2):
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2)
    features = torch.randn(2, 6, 5, 7, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        hidden = mlp.fc1(features, channels_last=True)
        inferred = mlp(features)
    assert hidden.is_contiguous(memory_format=torch.channels_last) and inferred.is_contiguous()
    output = mlp(features)
    torch.testing.assert_close(inferred, output, rtol=0, atol=1e-12)

    def plain(x):
        x = mlp.act(F.batch_norm(F.conv2d(x, mlp.fc1.weight, mlp.fc1.bias), mlp.norm1.running_mean,
                                 mlp.norm1.running_var, mlp.norm1.weight, mlp.norm1.bias, eps=mlp.norm1.eps))
        x = mlp.act(mlp.depthwise_norm(mlp.depthwise(x)))
        return mlp.norm2(F.conv2d(x, mlp.fc2.weight, mlp.fc2.bias))

    expected = plain(features)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-12)
    upstream = torch.randn_like(output)
    inputs = [features, *mlp.parameters()]
    for grad, expected_grad in zip(torch.autograd.grad(output, inputs, upstream), torch.autograd.grad(expected, inputs, upstream)):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)


def _reference_loss(logits, labels, ignore_index=255):
    upsampled = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(upsampled, labels, ignore_index=ignore_index)


@pytest.mark.parametrize("shapes", [((2, 7, 5, 6), (19, 23)), ((1, 4, 8, 8), (8, 8)), ((2, 3, 9, 4), (4, 2))])
def test_loss_is_the_cross_entropy_of_upsampled_logits(shapes):
    """The one-buffer loss against ``interpolate`` + ``cross_entropy`` in float64: value and gradient,
    with ignored pixels, upsampling by a non-integer factor, no resize, and downsampling."""
    from offseg_hf.models.loss import semantic_segmentation_loss

    (batch, classes, height, width), size = shapes
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, classes, height, width, dtype=torch.float64, generator=generator, requires_grad=True)
    labels = torch.randint(0, classes, (batch, *size), generator=generator)
    labels[0, : size[0] // 2] = 255
    expected = _reference_loss(logits, labels)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    loss = semantic_segmentation_loss(logits, labels, 255)
    (grad,) = torch.autograd.grad(loss * 3, logits)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, 3 * expected_grad, rtol=1e-12, atol=1e-12)


def test_loss_without_counted_pixels_and_in_bfloat16():
    from offseg_hf.models.loss import semantic_segmentation_loss

    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    labels = torch.full((1, 8, 8), 255)
    loss = semantic_segmentation_loss(logits, labels, 255)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(_reference_loss(logits, labels))  # F.cross_entropy's mean of nothing
    assert torch.equal(logits.grad, torch.zeros_like(logits))  # and its gradient: zero
    half = torch.randn(2, 5, 6, 6).bfloat16().requires_grad_()
    labels = torch.randint(0, 5, (2, 12, 12))
    loss = semantic_segmentation_loss(half, labels, 255)
    loss.backward()
    assert loss.dtype == torch.float32 and half.grad.dtype == torch.bfloat16  # computed in float32
    torch.testing.assert_close(loss, _reference_loss(half.detach().float(), labels), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="labels must be"):
        semantic_segmentation_loss(half, labels[0], 255)


def test_attention_bias_cache_follows_the_weights_and_the_size():
    """Without gradients the resized relative-position bias is cached; an in-place weight update, a dtype change
    and another input size each give the bias a fresh model computes (the traced path is in the compile test)."""
    torch.manual_seed(0)
    model = OffSegForSemanticSegmentation(tiny_offseg_config()).eval()
    bias = model.offseg.backbone.stages[-1].blocks[-1].attention.relative_position  # a 2×2 grid: 4 tokens
    f32 = torch.float32
    with torch.no_grad():
        first = bias(4, 4, f32).clone()
        assert bias(4, 4, f32) is bias(4, 4, f32)  # cached
        bias.attention_biases.add_(1.0)
        torch.testing.assert_close(bias(4, 4, f32), first + 1.0, rtol=0, atol=0)
        other = bias(6, 9, f32)
        assert other.shape[-2:] == (6, 9)
        half = bias(6, 9, torch.bfloat16)  # in the logits' dtype, cached in it
        assert half.dtype == torch.bfloat16 and bias(6, 9, torch.bfloat16) is half
        torch.testing.assert_close(half, other.bfloat16(), rtol=0, atol=0)
    with torch.enable_grad():
        assert bias(6, 9, f32).requires_grad  # with gradients: computed, not cached
        torch.testing.assert_close(bias(6, 9, f32), other, rtol=0, atol=0)
    model.double()
    with torch.no_grad():
        assert bias(4, 4, torch.float64).dtype == torch.float64


def _model_with_trained_statistics():
    torch.manual_seed(0)
    model = OffSegForSemanticSegmentation(tiny_offseg_config())
    for module in model.modules():  # BatchNorm statistics and affine parameters away from the identity
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def test_fold_batch_norm_computes_the_same_function():
    model = _model_with_trained_statistics()
    pixel_values = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = model(pixel_values).logits
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.offseg.backbone.modules())
    assert fold_batch_norm(model) == norms > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.offseg.backbone.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values).logits, expected, rtol=1e-4, atol=1e-4)
    assert fold_batch_norm(model) == 0  # idempotent


def test_fold_batch_norm_refuses_training_mode():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norm(OffSegForSemanticSegmentation(tiny_offseg_config()).train())


@pytest.mark.slow
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_whole_model_compiles_without_graph_breaks(training):
    """``torch.compile(fullgraph=True)`` traces the whole model (a graph break raises). The AOT-autograd backend
    runs the traced forward and backward graphs without inductor's code generation (minutes on 2 cores);
    ``python -m benchmarks.compare_models --compile`` measures the inductor build against eager on the full model.
    Static shapes (``dynamic=False``): each size is its own graph. The automatic dynamic-shape recompile at the
    second size took 98 s of 118 (standalone run; this test measured 150 s in pytest). Given up with it: that
    dynamo traces symbolic sizes without graph breaks (dynamic sizes are tested through torch.export instead:
    ``test_offseg_export_static_and_dynamic_sizes``, ``tests/test_export_onnx.py``)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = OffSegForSemanticSegmentation(tiny_offseg_config()).train(training)
    pixel_values = torch.randn(2, 3, 64, 96)
    labels = torch.randint(0, model.config.num_labels, (2, 64, 96))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=False)
    if not training:  # 64×64 is the tiny bias layout (the bias resize is skipped), 64×96 is not
        for inputs in (torch.randn(1, 3, 64, 64), pixel_values):
            with torch.no_grad():
                torch.testing.assert_close(compiled(inputs).logits, model(inputs).logits, rtol=0, atol=1e-5)
        return
    compiled(pixel_values=pixel_values, labels=labels).loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(pixel_values=pixel_values, labels=labels).loss.backward()
    assert len(grads) == sum(p.grad is not None for p in model.parameters()) > 100
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_inference_loader_folds_batch_norm_and_compiles_on_request(tmp_path):
    from offseg_hf.inference.predict import load_model

    model = _model_with_trained_statistics()
    model.save_pretrained(tmp_path)
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(pixel_values).logits
    folded, _ = load_model(str(tmp_path), device="cpu")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(pixel_values).logits, expected, rtol=1e-4, atol=1e-4)
    unfolded, _ = load_model(str(tmp_path), device="cpu", fold_batch_norm=False)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in unfolded.modules()) > 0
    compiled, _ = load_model(str(tmp_path), device="cpu", compile=True)
    assert hasattr(compiled.forward, "_torchdynamo_orig_callable")  # compiled lazily, at the first call


def test_predict_evaluate_and_train_take_a_compile_flag():
    import argparse

    from offseg_hf.cli import evaluate, predict
    from offseg_hf.training.train import parse_train_argv, resolve_config

    for command in (predict, evaluate):
        parser = argparse.ArgumentParser()
        command.add_arguments(parser)
        assert "--compile" in parser.format_help()
    overrides, _ = parse_train_argv(["--dataset", "synthetic", "--compile", "--output-dir", "unused"])
    training_args = resolve_config(overrides).training_args
    assert training_args.torch_compile is True and training_args.optim == "adamw_torch_fused"
