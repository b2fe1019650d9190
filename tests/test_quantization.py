"""CPU deployment formats on tiny configs: channels_last, bfloat16 and int8 PT2E static quantisation of the whole
model (every convolution and the offset-learning linears)."""

from __future__ import annotations

import pytest
import torch

from offseg_hf import OffSegForSemanticSegmentation, SegformerOffsetForSemanticSegmentation, SegNextForSemanticSegmentation
from offseg_hf.deploy.quantization import bfloat16_autocast, calibration_batches, to_bfloat16
from offseg_hf.inference.image_processing_offseg import build_image_processor
from test_modeling_common import tiny_offseg_config, tiny_segformer_offset_config
from test_modeling_segnext import tiny_config as tiny_segnext_config

pytestmark = pytest.mark.torch_threads(1)

MODELS = {
    "offseg": lambda: OffSegForSemanticSegmentation(tiny_offseg_config()),
    "segformer_offset": lambda: SegformerOffsetForSemanticSegmentation(tiny_segformer_offset_config()),
    "segnext": lambda: SegNextForSemanticSegmentation(tiny_segnext_config()),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_channels_last_weights_and_input_match_contiguous(name):
    """channels_last weights and input run and compute the same function: in float64 to 1e-12 (any layout bug
    would show), in float32 to 1e-5 (OffSeg measured 5.9e-6: its 1×1 convolutions are matrix products with NCHW
    results, so the decoder's GroupNorms run the same kernel as for a contiguous input; they used to take the
    channels-last kernel, which sums the statistics in another order: 1.2e-5)."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    pixel_values = torch.randn(2, 3, 70, 90)
    for dtype, atol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        contiguous = model.to(dtype=dtype, memory_format=torch.contiguous_format)
        with torch.no_grad():
            expected = contiguous(pixel_values.to(dtype)).logits
            channels_last = model.to(memory_format=torch.channels_last)
            got = channels_last(pixel_values.to(dtype).contiguous(memory_format=torch.channels_last)).logits
        torch.testing.assert_close(got, expected, atol=atol, rtol=0)


def test_bfloat16_autocast_and_cast_run_close_to_float32():
    torch.manual_seed(0)
    model = OffSegForSemanticSegmentation(tiny_offseg_config()).eval()
    pixel_values = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = model(pixel_values).logits
        with bfloat16_autocast():
            autocast = model(pixel_values).logits
        cast = to_bfloat16(model)(pixel_values.to(torch.bfloat16)).logits
    assert next(model.parameters()).dtype == torch.float32  # to_bfloat16 copies
    for logits in (autocast, cast):
        assert logits.shape == expected.shape and torch.isfinite(logits.float()).all()
        assert (logits.float().argmax(1) == expected.argmax(1)).float().mean() >= 0.9


def test_pt2e_int8_quantises_every_conv_and_linear_and_runs():
    pytest.importorskip("torchao", reason="the quantization extra (pip install -e '.[quantization]') is not installed")
    from offseg_hf.deploy.quantization import quantize_pt2e

    torch.manual_seed(0)
    model = OffSegForSemanticSegmentation(tiny_offseg_config()).eval()
    batches = calibration_batches(build_image_processor("ade20k"), num_batches=2, batch_size=2, size=(64, 96))
    assert batches[0].shape == (2, 3, 64, 96)
    quantized = quantize_pt2e(model, batches)

    def weight_quantised(node) -> bool:
        weight = node.args[1]
        return getattr(weight, "target", None) == torch.ops.quantized_decomposed.dequantize_per_channel.default

    convs = [n for n in quantized.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    linears = [n for n in quantized.graph.nodes if n.target == torch.ops.aten.linear.default]
    num_convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert len(convs) >= num_convs and len(linears) == 2  # class_offset_proj, feature_offset_proj
    assert all(weight_quantised(node) for node in convs + linears)
    with torch.no_grad():
        expected = model(batches[1]).logits
        got = quantized(batches[1])
    assert got.shape == expected.shape
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.9
