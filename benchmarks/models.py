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

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from offseg_hf.models.modeling_efficientformer_v2 import fold_batch_norm
from offseg_hf.models.modeling_offseg import OffSegFreqFusion
from offseg_hf.models.offset_learning import OffsetLearning

_CONV_OPS = {"convolution", "_convolution", "conv2d", "mkldnn_convolution"}
_MATMUL_OPS = {"mm", "bmm", "addmm", "baddbmm", "matmul", "_scaled_dot_product_flash_attention",
               "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"}
# Profiler names of the operators product_seconds sums: the counted ones, their in-place / composite / oneDNN forms.
_PRODUCT_OPS = _CONV_OPS | _MATMUL_OPS | {"conv_transpose2d", "baddbmm_", "linear", "_linear_pointwise", "_mkl_linear"}
# int8 products of a PT2E model compiled by inductor (oneDNN): ``onednn::qconv2d_pointwise``, ``qlinear_pointwise``…
_INT8_PRODUCT_PREFIXES = ("qconv", "qlinear")
# ONNX Runtime operators whose kernels are convolutions or matrix products (substrings of the node's op_name):
# Conv, ConvTranspose, FusedConv, NhwcFusedConv, QLinearConv, ConvInteger, MatMul, FusedMatMul, QLinearMatMul,
# MatMulInteger, MatMulIntegerToFloat, Gemm, FusedGemm, QGemm. A fused activation rides along with its product.
ORT_PRODUCT_OPS = ("Conv", "MatMul", "Gemm")
# CPU flags of the vector / matrix units that decide which precisions run natively.
CPU_UNIT_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "amx_int8", "avx512_vnni",
                  "avx_vnni")


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
    # Offset learning's products on K itself, not on K rounded up for the kernels (OffsetLearning.class_multiple).
    offset_learning = [m for m in model.modules() if isinstance(m, OffsetLearning)]
    counter = FlopCounterMode(display=False)
    try:
        for module in offset_learning:
            module.class_multiple = 1
        with torch.no_grad(), counter:
            model(pixel_values)
    finally:
        for hook in hooks:
            hook.remove()
        for module in offset_learning:
            del module.class_multiple  # back to the class's value
    counts = counter.get_flop_counts()
    for op in counts["Global"]:
        if _op_name(op) not in _CONV_OPS | _MATMUL_OPS:
            raise RuntimeError(f"unclassified counted op {op}: extend benchmark._CONV_OPS/_MATMUL_OPS")
    # Convolution layers count as convolutions whatever they run as (1×1 convolutions and talking heads are batched
    # matrix products here); a convolution op outside a layer is a fixed resampling filter (EfficientFormerV2's
    # bilinear ×2 as a transposed convolution) and is not counted, as interpolation is not.
    root = type(model).__name__
    layers = [f"{root}.{name}" for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    layers = [path for path in layers if path in counts]
    conv = sum(_macs(counts[path], _CONV_OPS | _MATMUL_OPS) for path in layers)
    matmul = _macs(counts["Global"], _MATMUL_OPS) - sum(_macs(counts[path], _MATMUL_OPS) for path in layers)
    # CARAFE runs as batched products (which also cover the zero margins of its layout): inside a fusion they
    # are the only ones outside its layers, so take them out of ``matmul``; ``carafe`` holds their exact count.
    fusion_paths = [path for path in counts if path.split(".")[-1].isdigit() and ".fusions." in path]
    for fusion in fusion_paths:
        in_layers = sum(_macs(counts[path], _MATMUL_OPS) for path in layers if path.startswith(fusion + "."))
        matmul -= _macs(counts[fusion], _MATMUL_OPS) - in_layers
    return MacCount(conv=conv, matmul=matmul, carafe=carafe)


def _op_name(op) -> str:
    return getattr(op, "__name__", str(op)).split(".")[0]


def _macs(flops_by_op: dict, kinds: set[str]) -> int:
    """Multiply-accumulates of the counted ops of the given kinds (the counter gives 2 FLOPs per MAC)."""
    return sum(flops // 2 for op, flops in flops_by_op.items() if _op_name(op) in kinds)


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


class _OperatorCounter(TorchDispatchMode):
    """Counts the aten operators that run (below autograd, so each op once, composites by their parts); views,
    which move no data, are left out."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_operators(function: Callable[[torch.Tensor], object], pixel_values: torch.Tensor) -> int:
    """Number of non-view aten operators one call of ``function(pixel_values)`` runs (no gradients)."""
    counter = _OperatorCounter()
    with torch.no_grad(), counter:
        function(pixel_values)
    return counter.count


def product_seconds(function: Callable[[], object], runs: int = 3, warmup: bool = True) -> float:
    """Seconds per call that ``function`` spends in convolutions and matrix products (profiler self CPU time of
    the aten / oneDNN convolution and ``mm``-family operators, and of inductor's external calls to them).

    A floor for the model's latency on this machine: whatever the rest costs, a forward cannot be faster than its
    products at the rate the libraries (oneDNN, MKL) run them. The profiler adds overhead per operator, so this
    is an upper estimate of that floor, not of the latency. ``warmup=False`` skips the untimed first call (for
    calls of many seconds, e.g. bfloat16 on a CPU without bfloat16 units, where set-up costs do not matter).
    """
    from torch.profiler import ProfilerActivity, profile

    if warmup:
        function()
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(runs):
            function()
    total = 0.0
    for event in profiler.key_averages():
        name = event.key.split("::")[-1]
        if ("convolution" in name or name.startswith("_scaled_dot_product") or name in _PRODUCT_OPS
                or name.startswith(_INT8_PRODUCT_PREFIXES)):
            total += event.self_cpu_time_total
    return total / runs / 1e6


def ort_product_seconds(path: str | os.PathLike, pixel_values, threads: int | None = None, runs: int = 3
                        ) -> tuple[float, float]:
    """``(products, all nodes)``: seconds per run that ONNX Runtime spends in the kernels of convolution and matrix
    product nodes (:data:`ORT_PRODUCT_OPS`: int8 and fused forms included), and in all nodes, from its profiler
    (``SessionOptions.enable_profiling``: one ``Node`` event with ``dur`` µs per kernel run), after one untimed run.

    The ONNX Runtime counterpart of :func:`product_seconds`: what the file's products cost at the rate of ONNX
    Runtime's kernels (MLAS) on this machine, with the graph as ONNX Runtime optimised it when loading.
    """
    import json
    import tempfile

    import numpy as np
    import onnxruntime

    pixel_values = np.ascontiguousarray(np.asarray(pixel_values, dtype=np.float32))
    with tempfile.TemporaryDirectory(prefix="offseg-ort-profile-") as folder:
        options = onnxruntime.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(folder, "profile")
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: pixel_values}
        for _ in range(runs + 1):
            session.run(None, feed)
        with open(session.end_profiling()) as file:
            events = json.load(file)
    model_runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    if len(model_runs) != runs + 1:
        raise RuntimeError(f"{path}: ONNX Runtime's profile holds {len(model_runs)} model_run events, expected {runs + 1}")
    timed_from = model_runs[0]["ts"] + model_runs[0]["dur"]  # leave out the first (untimed) run
    products = nodes = 0
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time") or event["ts"] < timed_from:
            continue
        nodes += event["dur"]
        if any(kind in event.get("args", {}).get("op_name", "") for kind in ORT_PRODUCT_OPS):
            products += event["dur"]
    return products / runs / 1e6, nodes / runs / 1e6


@dataclass
class CpuFacts:
    """What decides CPU speed per precision: the model name, logical CPUs, the vector / matrix unit flags
    (:data:`CPU_UNIT_FLAGS`, from ``/proc/cpuinfo``) and the load average."""

    model: str
    logical_cpus: int
    flags: dict[str, bool]
    load: tuple[float, float, float] | None

    @property
    def bf16_units(self) -> bool:
        """bfloat16 products in hardware (AVX512-BF16 or AMX-BF16); otherwise oneDNN converts to float32."""
        return self.flags.get("avx512_bf16", False) or self.flags.get("amx_bf16", False)

    @property
    def fp16_units(self) -> bool:
        """float16 products in hardware (AVX512-FP16 or AMX-FP16)."""
        return self.flags.get("avx512_fp16", False) or self.flags.get("amx_fp16", False)

    @property
    def int8_dot_units(self) -> bool:
        """int8 dot products in hardware (VNNI or AMX-INT8); without them int8 kernels widen to int16 (AVX2)."""
        return any(self.flags.get(flag, False) for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))

    def line(self) -> str:
        units = ", ".join(flag for flag, present in self.flags.items() if present) or "none of " + "/".join(self.flags)
        missing = ", ".join(flag for flag, present in self.flags.items() if not present)
        load = "n/a" if self.load is None else " / ".join(f"{value:.2f}" for value in self.load)
        return (f"{self.model}, {self.logical_cpus} logical CPUs; units: {units}" + (f" (no {missing})" if missing else "")
                + f"; load average (1/5/15 min) {load}")


def cpu_facts() -> CpuFacts:
    """The :class:`CpuFacts` of this machine (``/proc/cpuinfo`` on Linux; elsewhere the model from ``platform``
    and no flags known)."""
    import platform

    model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model is None:
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return CpuFacts(model=model, logical_cpus=os.cpu_count() or 0, flags={f: f in flags for f in CPU_UNIT_FLAGS},
                    load=load)


class Timer:
    """Wall-clock seconds of a call: ``perf_counter`` on the CPU, CUDA events (after a synchronise) on a GPU."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def __call__(self, function: Callable[[], object]) -> float:
        if self.device.type != "cuda":
            start = time.perf_counter()
            function()
            return time.perf_counter() - start
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(self.device)
        start.record()
        function()
        end.record()
        torch.cuda.synchronize(self.device)
        return start.elapsed_time(end) / 1000


def interleaved_times(
    calls: dict[str, Callable[[], object]], runs: int, warmup: int, timer: Timer | None = None
) -> dict[str, list[float]]:
    """Seconds of each call, measured round-robin (``runs`` rounds after ``warmup``) so that every model sees
    the same machine state; ratios are taken pairwise within a round."""
    timer = timer or Timer()
    for _ in range(warmup):
        for function in calls.values():
            function()
    times = {name: [] for name in calls}
    for _ in range(runs):
        for name, function in calls.items():
            times[name].append(timer(function))
    return times


def median_ratio(times: list[float], baseline: list[float]) -> float:
    """Median over rounds of ``times[i] / baseline[i]`` (robust to a machine whose load changes between rounds)."""
    return statistics.median(t / b for t, b in zip(times, baseline))


def measure_latency(
    function: Callable[[torch.Tensor], object], pixel_values: torch.Tensor, warmup: int = 2, runs: int = 5
) -> list[float]:
    """Wall-clock seconds of ``runs`` calls of ``function(pixel_values)`` after ``warmup`` calls."""
    with torch.inference_mode():
        return interleaved_times({"model": lambda: function(pixel_values)}, runs, warmup)["model"]


def training_step(model: nn.Module, batch_size: int = 2, size: int = 512, num_labels: int = 150, device="cpu",
                  autocast_dtype: torch.dtype | None = None):
    """A closure running one AdamW step (forward with labels, backward, update) on fixed random data; it returns
    the step's loss (detached). ``autocast_dtype`` runs the forward under ``torch.autocast`` in that precision."""
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(batch_size, 3, size, size, generator=generator).to(device)
    labels = torch.randint(0, num_labels, (batch_size, size, size), generator=generator).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # the training recipe's optimiser
    model.train()

    device_type = torch.device(device).type

    def step():
        with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = model(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _resident_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process from /proc, in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_memory_worker(name: str, workload: str, size: int, num_labels: int, threads: int | None, queue) -> None:
    if threads:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    model = build_model(name, num_labels)
    if workload == "inference":
        model = prepare_for_inference(model)
        pixel_values = torch.randn(1, 3, size, size)
        run = lambda: model(pixel_values)  # noqa: E731
    else:
        run = training_step(model, size=size, num_labels=num_labels)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets the peak (VmHWM) to the current resident size
    before = _resident_mib("VmRSS")
    with torch.inference_mode(workload == "inference"):
        run()
    queue.put(_resident_mib("VmHWM") - before)


def peak_memory_mib(name: str, workload: str, size: int = 512, num_labels: int = 150, threads: int | None = 2) -> float:
    """Peak resident memory (MiB) a fresh process adds for one ``workload`` ("inference", batch 1, or "training":
    one AdamW step, batch 2, gradients and optimiser state included) over what the built model already holds.

    CPU tensors have no allocator statistics, so this reads Linux's resident high-water mark (``VmHWM``, reset
    just before the workload) in a spawned process per measurement, so that no other model's peak hides it.
    """
    import multiprocessing

    if not os.path.exists("/proc/self/clear_refs"):
        raise RuntimeError("peak memory needs Linux's /proc/self/clear_refs (resettable peak resident size)")
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_peak_memory_worker, args=(name, workload, size, num_labels, threads, queue))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"peak-memory measurement of {name} ({workload}) failed with exit code {process.exitcode}")
    return queue.get()


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """Eval mode with EfficientFormerV2's BatchNorms folded into their convolutions, as ``offseg predict`` runs."""
    model.eval()
    fold_batch_norm(model)
    return model


SEGFORMER_VARIANTS = {
    # (hidden_sizes, depths, num_attention_heads, decoder_hidden_size), as in nvidia/mit-b{0,1,2}.
    "segformer-b0": ([32, 64, 160, 256], [2, 2, 2, 2], [1, 2, 5, 8], 256),
    "segformer-b1": ([64, 128, 320, 512], [2, 2, 2, 2], [1, 2, 5, 8], 256),
    "segformer-b2": ([64, 128, 320, 512], [3, 4, 6, 3], [1, 2, 5, 8], 768),
}


def build_model(name: str, num_labels: int = 150) -> nn.Module:
    """Randomly initialised ``offseg-{t,b,l}``, ``segnext-{t,s,b,l}[-offset]`` or transformers' ``segformer-b{0,1,2}``
    in eval mode; a model folder (any this package can make) is loaded by :func:`offseg_hf.inference.predict.load_model`."""
    from pathlib import Path

    if Path(name).expanduser().is_dir():
        from offseg_hf.inference.predict import load_model

        return load_model(name, device="cpu", fold_batch_norm=False)[0]  # folded by prepare_for_inference
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
    """One model's figures; ratios are pairwise medians against the baseline model of the same run."""

    name: str
    parameters: int
    macs: MacCount
    operators: int
    latencies: list[float]
    latency_ratio: float = 1.0
    compiled_latencies: list[float] | None = None
    compiled_ratio: float | None = None
    compiled_max_diff: float | None = None
    product_time: float | None = None
    compiled_product_time: float | None = None
    train_times: list[float] | None = None
    train_ratio: float | None = None
    train_batch: int = 2
    peak_train_mib: float | None = None
    peak_inference_mib: float | None = None

    @property
    def median_latency(self) -> float:
        return statistics.median(self.latencies)

    @property
    def images_per_second(self) -> float | None:
        return self.train_batch / statistics.median(self.train_times) if self.train_times else None


def run_benchmark(
    names: list[str],
    size: int = 512,
    runs: int = 5,
    warmup: int = 2,
    threads: int | None = 2,
    num_labels: int = 150,
    baseline: str = "segformer-b0",
    train_runs: int = 0,
    compile: bool = False,
    memory: bool = False,
    products: bool = False,
) -> list[BenchmarkRow]:
    """Benchmark the models in one process on a `1×3×size×size` input, interleaved round by round.

    Inference runs the models as ``offseg predict`` does (eval, BatchNorm folded). ``train_runs`` > 0 adds one
    AdamW step at batch 2 per round; ``compile`` adds ``torch.compile`` (inductor) inference; ``memory`` adds
    the peak memory of a training step and of inference, each in a fresh process; ``products`` adds the time per
    forward spent in convolutions and matrix products (:func:`product_seconds`), eager and compiled.
    """
    if threads:
        torch.set_num_threads(threads)
    # Randomly initialised weights (e.g. EfficientFormerV2's 1e-5 layer scales) produce subnormal floats that
    # slow x86 CPUs down by up to 20x; trained weights do not. Flush them to zero for every model alike.
    torch.set_flush_denormal(True)
    if baseline not in names:
        names = [baseline, *names]
    pixel_values = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    models = {name: build_model(name, num_labels) for name in names}
    parameters = {name: count_parameters(model) for name, model in models.items()}  # before folding
    models = {name: prepare_for_inference(model) for name, model in models.items()}
    rows = {
        name: BenchmarkRow(
            name=name,
            parameters=parameters[name],
            macs=count_macs(model, pixel_values),
            operators=count_operators(model, pixel_values),
            latencies=[],
        )
        for name, model in models.items()
    }
    with torch.inference_mode():
        times = interleaved_times({n: (lambda m=m: m(pixel_values)) for n, m in models.items()}, runs, warmup)
    for name, row in rows.items():
        row.latencies = times[name]
        row.latency_ratio = median_ratio(times[name], times[baseline])
        if products:
            with torch.inference_mode():
                row.product_time = product_seconds(lambda m=models[name]: m(pixel_values))
    if compile:
        compiled = {name: torch.compile(model) for name, model in models.items()}
        with torch.inference_mode():
            for name, function in compiled.items():
                rows[name].compiled_max_diff = (
                    (function(pixel_values).logits - models[name](pixel_values).logits).abs().max().item()
                )
            times = interleaved_times({n: (lambda f=f: f(pixel_values)) for n, f in compiled.items()}, runs, warmup)
        for name, row in rows.items():
            row.compiled_latencies = times[name]
            row.compiled_ratio = median_ratio(times[name], times[baseline])
            if products:
                with torch.inference_mode():
                    row.compiled_product_time = product_seconds(lambda f=compiled[name]: f(pixel_values))
    del models
    if train_runs:
        steps = {name: training_step(build_model(name, num_labels), size=size, num_labels=num_labels) for name in names}
        times = interleaved_times(steps, train_runs, warmup=1)
        for name, row in rows.items():
            row.train_times = times[name]
            row.train_ratio = median_ratio(times[name], times[baseline])
    if memory:
        for name, row in rows.items():
            row.peak_train_mib = peak_memory_mib(name, "training", size, num_labels, threads)
            row.peak_inference_mib = peak_memory_mib(name, "inference", size, num_labels, threads)
    return list(rows.values())


def format_table(rows: list[BenchmarkRow], baseline: str = "segformer-b0") -> str:
    """Markdown table; ratios are relative to ``baseline`` (pairwise medians, measured in the same run)."""
    base = next((row for row in rows if row.name == baseline), rows[0])
    columns = [
        ("model", lambda r: r.name),
        ("params (M)", lambda r: f"{r.parameters / 1e6:.2f}"),
        ("conv MACs (G)", lambda r: f"{r.macs.conv / 1e9:.2f}"),
        ("all MACs (G)", lambda r: f"{r.macs.total / 1e9:.2f}"),
        ("operators / forward", lambda r: str(r.operators)),
        ("inference median / min (s)", lambda r: f"{r.median_latency:.3f} / {min(r.latencies):.3f}"),
        (f"inference / {base.name}", lambda r: f"{r.latency_ratio:.2f}"),
    ]
    if base.compiled_latencies is not None:
        columns += [
            ("compiled median (s)", lambda r: f"{statistics.median(r.compiled_latencies):.3f}"),
            ("compiled / own eager", lambda r: f"{statistics.median(r.compiled_latencies) / r.median_latency:.2f}"),
            (f"compiled / compiled {base.name}", lambda r: f"{r.compiled_ratio:.2f}"),
            ("compiled max abs diff", lambda r: f"{r.compiled_max_diff:.1e}"),
        ]
    if base.product_time is not None:
        columns += [
            ("products / forward (s)", lambda r: f"{r.product_time:.3f}"),
            (f"products / {base.name} latency", lambda r: f"{r.product_time / base.median_latency:.2f}"),
        ]
    if base.compiled_product_time is not None:
        compiled_base = statistics.median(base.compiled_latencies)
        columns += [
            ("compiled products / forward (s)", lambda r: f"{r.compiled_product_time:.3f}"),
            (f"compiled products / compiled {base.name} latency", lambda r: f"{r.compiled_product_time / compiled_base:.2f}"),
        ]
    if base.train_times is not None:
        columns += [
            (f"train step b{base.train_batch} (s)", lambda r: f"{statistics.median(r.train_times):.2f}"),
            ("img/s", lambda r: f"{r.images_per_second:.2f}"),
            (f"train / {base.name}", lambda r: f"{r.train_ratio:.2f}"),
        ]
    if base.peak_train_mib is not None:
        columns += [
            ("peak MiB train / inference", lambda r: f"{r.peak_train_mib:.0f} / {r.peak_inference_mib:.0f}"),
            (
                f"train memory / {base.name}",
                lambda r: f"{r.peak_train_mib / base.peak_train_mib:.2f}" if base.peak_train_mib > 0 else "–",
            ),
        ]
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    lines += ["| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows]
    return "\n".join(lines)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DeviceRow:
    name: str
    precision: str
    batch: int
    mode: str
    latencies: list[float]
    ratio: float = 1.0


def run_device_benchmark(
    names: list[str],
    device: str = "cuda",
    size: int = 512,
    batches: tuple[int, ...] = (1, 8),
    precisions: tuple[str, ...] = ("fp32", "bf16", "fp16"),
    modes: tuple[str, ...] = ("eager", "compiled", "cudagraphs"),
    runs: int = 20,
    warmup: int = 5,
    num_labels: int = 150,
    baseline: str = "segformer-b0",
) -> list[DeviceRow]:
    """Inference latency on ``device`` (CUDA events on a GPU) for every precision (autocast) × batch × mode;
    ratios against ``baseline`` at the same precision, batch and mode. ``cudagraphs`` is
    ``torch.compile(mode="reduce-overhead")``, which records CUDA graphs (on other devices it is skipped).

    Written for CUDA; every part that does not need a GPU also runs on the CPU (and is tested there).
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is visible to PyTorch on this machine; run it on a GPU")
    timer = Timer(device)
    if baseline not in names:
        names = [baseline, *names]
    models = {name: prepare_for_inference(build_model(name, num_labels)).to(device) for name in names}
    rows = []
    for mode in modes:
        if mode == "cudagraphs" and device.type != "cuda":
            continue
        runners = {
            name: model if mode == "eager" else torch.compile(model, mode="reduce-overhead" if mode == "cudagraphs" else None)
            for name, model in models.items()
        }
        for precision in precisions:
            dtype = PRECISIONS[precision]
            for batch in batches:
                pixel_values = torch.randn(batch, 3, size, size, device=device)
                calls = {}
                for name, runner in runners.items():
                    def call(runner=runner):
                        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                            return runner(pixel_values)
                    calls[name] = call
                with torch.inference_mode():
                    times = interleaved_times(calls, runs, warmup, timer)
                for name in names:
                    rows.append(
                        DeviceRow(name, precision, batch, mode, times[name], median_ratio(times[name], times[baseline]))
                    )
    return rows


def format_device_table(rows: list[DeviceRow], baseline: str = "segformer-b0") -> str:
    lines = [
        f"| model | precision | batch | mode | median (ms) | min (ms) | / {baseline} |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.name} | {row.precision} | {row.batch} | {row.mode} | {statistics.median(row.latencies) * 1e3:.2f} "
            f"| {min(row.latencies) * 1e3:.2f} | {row.ratio:.2f} |"
        )
    return "\n".join(lines)


__all__ = [
    "BenchmarkRow",
    "CpuFacts",
    "cpu_facts",
    "ort_product_seconds",
    "DeviceRow",
    "Timer",
    "count_operators",
    "format_device_table",
    "interleaved_times",
    "median_ratio",
    "peak_memory_mib",
    "prepare_for_inference",
    "run_device_benchmark",
    "training_step",
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
