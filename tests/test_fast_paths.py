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
from offseg_hf.models.modeling_offseg import neighbour_cosine_similarity
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
    [(2, 6, (5, 7), 3, 1, 1), (2, 8, (4, 6), 5, 2, 2), (1, 5, (3, 3), 5, 2, 1), (3, 4, (6, 2), 3, 2, 4), (1, 2, (1, 1), 5, 1, 1)],
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
    ``python -m benchmarks.compare_models --compile`` measures the inductor build against eager on the full model."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = OffSegForSemanticSegmentation(tiny_offseg_config()).train(training)
    pixel_values = torch.randn(2, 3, 64, 96)
    labels = torch.randint(0, model.config.num_labels, (2, 64, 96))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    if not training:
        with torch.no_grad():
            torch.testing.assert_close(compiled(pixel_values).logits, model(pixel_values).logits, rtol=0, atol=1e-5)
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
