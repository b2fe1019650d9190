"""The precision policy (``offseg_hf/models/precision.py``): reduced-precision formulations against the float64
oracle (forward and gradient), the dtypes autocast and ``.to(bfloat16)`` run in, the casts a forward makes, and
one autocast training step of every model type.

Tolerances in bfloat16 are derived from its 8-bit significand: unit roundoff ``u = 2⁻⁸``. The products of two
bfloat16 numbers are exact in float32 (16 ≤ 24 bits) and the sums below run in float32, so the error of a
reduced-precision result is a few roundings to bfloat16, each at most ``u`` times the sum of the absolute terms
(``Σ|a||b|``, computed by the oracle on absolute values). Each test states how many roundings it allows.
"""

from __future__ import annotations

import collections
import traceback

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from offseg_hf import (
    OffSegForSemanticSegmentation,
    SegformerOffsetForSemanticSegmentation,
    SegNextForSemanticSegmentation,
    carafe,
)
from offseg_hf.models.modeling_efficientformer_v2 import pointwise_conv
from offseg_hf.models.modeling_offseg import OffSegSimilaritySampler, neighbour_cosine_similarity
from test_fast_paths import carafe_by_taps, similarity_by_shifts
from test_modeling_common import tiny_offseg_config, tiny_segformer_offset_config
from test_modeling_segnext import tiny_config as tiny_segnext_config

pytestmark = pytest.mark.torch_threads(1)

UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}

MODELS = {
    "offseg": lambda: OffSegForSemanticSegmentation(tiny_offseg_config()),
    "segformer_offset": lambda: SegformerOffsetForSemanticSegmentation(tiny_segformer_offset_config()),
    "segnext": lambda: SegNextForSemanticSegmentation(tiny_segnext_config()),
}


def _assert_within(got: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    error = (got.double() - exact).abs()
    worst = (error - bound).argmax()
    assert (error <= bound).all(), (
        f"{what}: error {error.flatten()[worst].item():.3g} exceeds its bound {bound.flatten()[worst].item():.3g}"
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel_size,scale,groups", [(3, 1, 1), (5, 2, 1), (3, 2, 2)])
def test_reduced_precision_carafe_against_the_float64_oracle(dtype, kernel_size, scale, groups):
    """Half-precision inputs, oracle on the same (rounded) values in float64. Forward: the scale-1 form rounds its
    first product and its result, the scale-2 product only its result, so the error is ≤ 2u·Σ|k||x|. Backward:
    the window gradients are rounded once before their float32 sum, the sum once: ≤ 2u·Σ|k||g| for the features,
    one rounding (≤ 2u allowed) for the kernels. A sum rounded at each of the k² steps exceeds these bounds."""
    u = UNIT_ROUNDOFF[dtype]
    generator = torch.Generator().manual_seed(0)
    shape = (2, 8, 12, 10)
    features = torch.randn(shape, generator=generator).to(dtype).requires_grad_()
    logits = torch.randn(2, groups * kernel_size**2, 12 * scale, 10 * scale, generator=generator) * 2
    kernels = logits.view(2, groups, kernel_size**2, 12 * scale, 10 * scale).softmax(2).view_as(logits)
    kernels = kernels.to(dtype).requires_grad_()
    output = carafe(features, kernels, kernel_size, scale, groups)
    assert output.dtype == dtype
    upstream = torch.randn(output.shape, generator=generator).to(dtype)
    grads = torch.autograd.grad(output, (features, kernels), upstream)
    assert [g.dtype for g in grads] == [dtype, dtype]

    exact_inputs = [features.detach().double().requires_grad_(), kernels.detach().double().requires_grad_()]
    exact = carafe_by_taps(*exact_inputs, kernel_size, scale, groups)
    exact_grads = torch.autograd.grad(exact, exact_inputs, upstream.double())
    magnitudes = [t.detach().double().abs().requires_grad_() for t in (features, kernels)]
    magnitude = carafe_by_taps(*magnitudes, kernel_size, scale, groups)  # Σ|k||x|
    grad_magnitudes = torch.autograd.grad(magnitude, magnitudes, upstream.double().abs())  # Σ|k||g|, Σ|x||g|
    _assert_within(output, exact.detach(), 2 * u * magnitude.detach(), "forward")
    for grad, exact_grad, bound, name in zip(grads, exact_grads, grad_magnitudes, ("features", "kernels")):
        _assert_within(grad, exact_grad, 2 * u * bound, f"gradient of the {name}")


def test_carafe_under_autocast_runs_in_autocasts_dtype_and_backward_in_the_forwards():
    """float32 inputs under bfloat16 autocast: CARAFE computes what it computes on the inputs cast to bfloat16
    (bit for bit), and its gradients reach the float32 inputs as float32 (custom_fwd / custom_bwd)."""
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(1, 6, 7, 5, generator=generator, requires_grad=True)
    kernels = torch.randn(1, 25, 14, 10, generator=generator).softmax(1).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = carafe(features, kernels, 5, scale=2)
    assert output.dtype == torch.bfloat16
    cast = [features.detach().bfloat16().requires_grad_(), kernels.detach().bfloat16().requires_grad_()]
    expected = carafe(*cast, 5, scale=2)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    upstream = torch.randn(output.shape, generator=generator).bfloat16()
    grads = torch.autograd.grad(output, (features, kernels), upstream)
    expected_grads = torch.autograd.grad(expected, cast, upstream)
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, expected_grad.float(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_cosine_similarity_against_the_float64_oracle(dtype):
    """In the features' dtype: the products and squares round once, the float32 channel sums once, the two norms'
    square roots and their product once each, the quotient once. Each rounding moves a similarity in [−1, 1] by at
    most u (Cauchy–Schwarz bounds every partial term by the normaliser), so |error| ≤ 8u. Zero vectors (the border
    of the zero-padded map) keep similarity 0, also in float16, whose 1e-8 guard would round to zero."""
    u = UNIT_ROUNDOFF[dtype]
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(2, 16, 9, 11, generator=generator)
    features[:, :, 4, 5] = 0  # an all-zero pixel inside the map
    half = features.to(dtype)
    got = neighbour_cosine_similarity(half)
    assert got.dtype == dtype and torch.isfinite(got).all()
    exact = similarity_by_shifts(half.double())
    _assert_within(got, exact, torch.full_like(exact, 8 * u), "similarity")
    assert (got[:, :, 4, 5] == 0).all()


def test_sampling_grid_stays_in_float32_for_bfloat16_features():
    """The resampler's positions: with bfloat16 features and offsets, ``sample`` equals the float32 computation on
    the same values up to the final rounding of the sampled map (≤ u·|value|), where a bfloat16 grid is off by up
    to half a pixel on a 128×128 map (bfloat16 resolves 0.5 px between 64 and 128)."""
    torch.manual_seed(3)
    sampler = OffSegSimilaritySampler(in_channels=16, groups=2, kernel_size=3)
    features = torch.randn(1, 8, 128, 128).bfloat16()
    offset = (torch.rand(1, 2 * 2 * 4, 64, 64) - 0.5).bfloat16()
    got = sampler.sample(features, offset)
    assert got.dtype == torch.bfloat16
    exact = sampler.sample(features.double(), offset.double())
    # + 2e-4: float32 positions near 128 px are within 1.5e-5 px of float64's, times a neighbour difference ≤ 8
    _assert_within(got, exact, 2.0**-8 * exact.abs() + 2e-4, "sampled map")


def test_pointwise_conv_under_autocast_is_the_autocast_convolution():
    """The 1×1 convolution as a batched product under bfloat16 autocast: bfloat16 out, and the same numbers as
    ``F.conv2d`` under autocast to one rounding of the float32-accumulated result (≤ 2u·Σ|w||x| + bias rounding)."""
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 24, 6, 7, generator=generator)
    weight = torch.randn(16, 24, 1, 1, generator=generator)
    bias = torch.randn(16, generator=generator)
    u = UNIT_ROUNDOFF[torch.bfloat16]
    for channels_last in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = pointwise_conv(hidden, weight, bias, channels_last=channels_last)
        assert got.dtype == torch.bfloat16
        rounded = [t.bfloat16().double() for t in (hidden, weight, bias)]
        exact = F.conv2d(*rounded)
        magnitude = F.conv2d(rounded[0].abs(), rounded[1].abs(), rounded[2].abs())
        _assert_within(got, exact, 2 * u * magnitude, f"pointwise_conv (channels_last={channels_last})")


class _CastCounter(TorchDispatchMode):
    """Records every dtype conversion of an activation (not of a parameter or buffer), by the package function
    that made it."""

    CONVERSIONS = (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout)

    def __init__(self, model, pixel_values):
        super().__init__()
        exempt = [*model.parameters(), *model.buffers(), pixel_values]  # weights, and the input image
        self.weights = {t.untyped_storage().data_ptr() for t in exempt}
        self.sites = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        source = args[0] if args else None
        converts = func in self.CONVERSIONS or (func is torch.ops.aten.copy_.default and args[0].dtype != args[1].dtype)
        if func is torch.ops.aten.copy_.default:
            source = args[1]
        if converts and isinstance(output, torch.Tensor) and output.dtype != source.dtype:
            caller = traceback.extract_stack()[-2]  # the Python line that called the operator
            if source.untyped_storage().data_ptr() not in self.weights and (
                "/offseg_hf/" in caller.filename or "/torch/nn/" in caller.filename
            ):  # ours, or autocast's at one of our layers (not inside a library's composite operator such as SDPA)
                self.sites[caller.name] += 1
        return output


# Where an activation may change dtype (precision.py names why): CARAFE's float32 accumulation at scale 1 and the
# resampler's float32 grid sampling.
ALLOWED_CASTS = {"_carafe_by_taps", "sample"}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("mode", ["autocast", "weights"])
def test_bfloat16_forward_casts_activations_only_where_the_policy_says(name, mode):
    """Under bfloat16 autocast and with ``.to(bfloat16)`` weights, no activation changes dtype except at the
    policy's exceptions (before: 72 activation casts in OffSeg-T's forward, from float32 layer scales, attention
    biases and class embeddings promoting the bfloat16 stream and the products casting it back)."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    if mode == "weights":
        model, pixel_values = model.to(torch.bfloat16), pixel_values.to(torch.bfloat16)
    counter = _CastCounter(model, pixel_values)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        model(pixel_values)  # the attention biases are cast once, cached in the logits' dtype
        with counter:
            logits = model(pixel_values).logits
    assert logits.dtype == torch.bfloat16
    unexpected = {site: n for site, n in counter.sites.items() if site not in ALLOWED_CASTS}
    assert not unexpected, f"activations cast in {unexpected}"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bfloat16_inference_agrees_with_float32(name):
    """Autocast and ``.to(bfloat16)`` run, give finite bfloat16 logits and agree with float32 on the arg-max."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    pixel_values = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        expected = model(pixel_values).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(pixel_values).logits
        cast = model.to(torch.bfloat16)(pixel_values.bfloat16()).logits
    for logits in (autocast, cast):
        assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
        assert (logits.argmax(1) == expected.argmax(1)).float().mean() >= 0.9


def _mask2former_offset():
    from offseg_hf.models import Mask2FormerOffsetForUniversalSegmentation
    from test_mask2former_inference import tiny_config as tiny_mask2former_config

    return Mask2FormerOffsetForUniversalSegmentation(tiny_mask2former_config(num_labels=4))


TRAINABLE = {**MODELS, "mask2former_offset": _mask2former_offset}


def _loss(model, pixel_values, labels):
    if model.config.model_type != "mask2former_offset":
        return model(pixel_values, labels=labels).loss
    from offseg_hf.data.pipeline import semantic_to_mask_targets

    masks, classes = semantic_to_mask_targets(labels, ignore_index=255)
    return model(pixel_values=pixel_values, mask_labels=masks, class_labels=classes).loss


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(TRAINABLE))
def test_autocast_training_step(name, dtype):
    """One AdamW step under autocast (float16 with a gradient scaler, as Trainer's ``--fp16`` runs) for every model
    type: float32 weights and gradients, finite, and a loss within 1 % of the float32 loss on the same batch
    (the random-weight losses here are about ln K; a relative error of a few u per logit moves them ≪ 1 %)."""
    torch.manual_seed(0)
    model = TRAINABLE[name]().train()
    for module in model.modules():  # stochastic depth and dropout off: the float32 and autocast losses see one network
        if isinstance(module, torch.nn.Dropout) or "DropPath" in type(module).__name__:
            module.p = 0.0 if hasattr(module, "p") else None
            if hasattr(module, "drop_prob"):
                module.drop_prob = 0.0
    generator = torch.Generator().manual_seed(5)
    pixel_values = torch.randn(2, 3, 64, 64, generator=generator)
    labels = torch.randint(0, model.config.num_labels, (2, 64, 64), generator=generator)
    labels[:, :4] = 255
    reference = _loss(model, pixel_values, labels).item()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    with torch.autocast("cpu", dtype=dtype):
        loss = _loss(model, pixel_values, labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - reference) <= 0.01 * abs(reference), (loss.item(), reference)
    before = [p.detach().clone() for p in model.parameters()]
    for attempt in range(20):  # float16: the scaler skips the steps whose scaled gradients overflow, halving its scale
        if attempt:
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=dtype):
                loss = _loss(model, pixel_values, labels)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(g.dtype == torch.float32 for g in grads)
        finite = all(torch.isfinite(g).all() for g in grads)
        scaler.step(optimizer)
        scaler.update()
        if finite:
            break
    assert finite, "no step with finite gradients"
    assert dtype == torch.float16 or attempt == 0  # bfloat16 needs no scaling
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert all(p.dtype == torch.float32 for p in model.parameters())
