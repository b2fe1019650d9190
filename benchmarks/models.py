"""Parameters, multiply-accumulates (MACs) and CPU latency of OffSeg and SegNeXt next to Transformers' SegFormer.

MACs are counted two ways (input 1×3×512×512 in the paper):

* ``conv``: convolutions only — the convention that reproduces the paper's "FLOPs" (5.3/10.3/17.1 G for
  OffSeg-T/B/L);
* ``total``: convolutions + matrix products (attention, offset learning, linear layers) + CARAFE, i.e. every
  multiply-add of a matmul-like op (elementwise ops, norms, softmax and resampling are not counted).

Counting uses :class:`torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per MAC for conv/matmul ops);
CARAFE is a loop of elementwise multiply-adds that the counter does not see, so its MACs
(output elements × k²) are added from the shapes each :class:`OffSegFreqFusion` sees.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from offseg_hf.models.modeling_offseg import OffSegFreqFusion

_CONV_OPS = {"convolution", "_convolution", "conv2d", "mkldnn_convolution"}
_MATMUL_OPS = {"mm", "bmm", "addmm", "baddbmm", "matmul", "_scaled_dot_product_flash_attention",
               "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"}


@dataclass
class MacCount:
    """Multiply-accumulates of one forward pass, by kind."""

    conv: int
    matmul: int
    carafe: int

    @property
    def total(self) -> int:
        return self.conv + self.matmul + self.carafe


def freqfusion_carafe_macs(fusion: OffSegFreqFusion, hr_shape: torch.Size, lr_channels: int) -> int:
    """MACs of the five CARAFE calls of one fusion with a high-res input of shape `(B, C_hr, H, W)`."""
    batch, hr_channels, height, width = hr_shape
    compressed = fusion.hr_channel_compressor.out_channels
    low, high = fusion.lowpass_kernel**2, fusion.highpass_kernel**2
    per_pixel = (
        compressed * high  # AHPF on the compressed high-res map
        + low * low  # low-pass kernels of the low-res branch, upsampled
        + high * low  # high-pass kernels of the low-res branch, upsampled
        + lr_channels * low  # the feature upsampling itself
        + hr_channels * high  # AHPF on the high-res feature
    )
    return batch * height * width * per_pixel


def count_macs(model: nn.Module, pixel_values: torch.Tensor) -> MacCount:
    """Count the MACs of ``model(pixel_values)`` (eval mode, no gradients)."""
    carafe = 0

    def on_fusion(module, inputs, output):
        nonlocal carafe
        hr_features, lr_features = inputs
        carafe += freqfusion_carafe_macs(module, hr_features.shape, lr_features.shape[1])

    hooks = [m.register_forward_hook(on_fusion) for m in model.modules() if isinstance(m, OffSegFreqFusion)]
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(pixel_values)
    finally:
        for hook in hooks:
            hook.remove()
    conv = matmul = 0
    for op, flops in counter.get_flop_counts()["Global"].items():
        name = getattr(op, "__name__", str(op)).split(".")[0]
        if name in _CONV_OPS:
            conv += flops // 2
        elif name in _MATMUL_OPS:
            matmul += flops // 2
        else:
            raise RuntimeError(f"unclassified counted op {op}: extend benchmark._CONV_OPS/_MATMUL_OPS")
    return MacCount(conv=conv, matmul=matmul, carafe=carafe)


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def measure_latency(
    function: Callable[[torch.Tensor], object], pixel_values: torch.Tensor, warmup: int = 2, runs: int = 5
) -> list[float]:
    """Wall-clock seconds of ``runs`` calls of ``function(pixel_values)`` after ``warmup`` calls."""
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            function(pixel_values)
        for _ in range(runs):
            start = time.perf_counter()
            function(pixel_values)
            times.append(time.perf_counter() - start)
    return times


SEGFORMER_VARIANTS = {
    # (hidden_sizes, depths, num_attention_heads, decoder_hidden_size), as in nvidia/mit-b{0,1,2}.
    "segformer-b0": ([32, 64, 160, 256], [2, 2, 2, 2], [1, 2, 5, 8], 256),
    "segformer-b1": ([64, 128, 320, 512], [2, 2, 2, 2], [1, 2, 5, 8], 256),
    "segformer-b2": ([64, 128, 320, 512], [3, 4, 6, 3], [1, 2, 5, 8], 768),
}


def build_model(name: str, num_labels: int = 150) -> nn.Module:
    """Randomly initialised ``offseg-{t,b,l}``, ``segnext-{t,s,b,l}[-offset]`` or transformers' ``segformer-b{0,1,2}``
    in eval mode."""
    if name.startswith("segnext"):
        from offseg_hf.models.configuration_segnext import SegNextConfig
        from offseg_hf.models.modeling_segnext import SegNextForSemanticSegmentation

        return SegNextForSemanticSegmentation(SegNextConfig.from_preset(name, num_labels=num_labels)).eval()
    if name.startswith("offseg"):
        from offseg_hf.models.configuration_offseg import OffSegConfig
        from offseg_hf.models.modeling_offseg import OffSegForSemanticSegmentation

        return OffSegForSemanticSegmentation(OffSegConfig.from_preset(name, num_labels=num_labels)).eval()
    if name in SEGFORMER_VARIANTS:
        from transformers import SegformerConfig, SegformerForSemanticSegmentation

        hidden, depths, heads, decoder = SEGFORMER_VARIANTS[name]
        config = SegformerConfig(
            hidden_sizes=hidden, depths=depths, num_attention_heads=heads, decoder_hidden_size=decoder,
            num_labels=num_labels,
        )
        return SegformerForSemanticSegmentation(config).eval()
    raise ValueError(
        f"unknown model {name!r}; choose offseg-t/b/l, segnext-t/s/b/l[-offset] or one of {sorted(SEGFORMER_VARIANTS)}"
    )


@dataclass
class BenchmarkRow:
    name: str
    parameters: int
    macs: MacCount
    latencies: list[float]

    @property
    def median_latency(self) -> float:
        return statistics.median(self.latencies)


def run_benchmark(
    names: list[str], size: int = 512, runs: int = 5, warmup: int = 2, threads: int | None = 2, num_labels: int = 150
) -> list[BenchmarkRow]:
    """Benchmark each model on one `1×3×size×size` input in the same process, one after the other."""
    if threads:
        torch.set_num_threads(threads)
    # Randomly initialised weights (e.g. EfficientFormerV2's 1e-5 layer scales) produce subnormal floats that
    # slow x86 CPUs down by up to 20x; trained weights do not. Flush them to zero for every model alike.
    torch.set_flush_denormal(True)
    pixel_values = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    rows = []
    for name in names:
        model = build_model(name, num_labels)
        rows.append(
            BenchmarkRow(
                name=name,
                parameters=count_parameters(model),
                macs=count_macs(model, pixel_values),
                latencies=measure_latency(model, pixel_values, warmup=warmup, runs=runs),
            )
        )
    return rows


def format_table(rows: list[BenchmarkRow], baseline: str = "segformer-b0") -> str:
    """Markdown table; latency ratios are relative to ``baseline`` (measured in the same run)."""
    base = next((row for row in rows if row.name == baseline), rows[0])
    lines = [
        "| model | params (M) | conv MACs (G) | all MACs (G) | CPU latency median (s) | latency / "
        f"{base.name} |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.name} | {row.parameters / 1e6:.2f} | {row.macs.conv / 1e9:.2f} | {row.macs.total / 1e9:.2f} | "
            f"{row.median_latency:.3f} | {row.median_latency / base.median_latency:.2f} |"
        )
    return "\n".join(lines)


__all__ = [
    "BenchmarkRow",
    "MacCount",
    "SEGFORMER_VARIANTS",
    "build_model",
    "count_macs",
    "count_parameters",
    "format_table",
    "freqfusion_carafe_macs",
    "measure_latency",
    "run_benchmark",
]
