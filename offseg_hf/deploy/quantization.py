"""CPU inference in bfloat16 and int8.

* **bfloat16**: :func:`bfloat16_autocast` (weights stay float32, matmuls / convolutions run in bfloat16) and
  :func:`to_bfloat16` (a bfloat16 copy of the whole model). The logits come back as float32 either way.
* **int8, PT2E static** (:func:`quantize_pt2e`): ``torch.export`` → ``prepare_pt2e`` with torchao's
  ``X86InductorQuantizer`` (per-channel symmetric int8 weights, per-tensor affine int8 activations: every
  convolution and every ``nn.Linear``, the offset-learning projections included) → calibration on synthetic scenes
  (:func:`calibration_batches`, :mod:`offseg_hf.data.synthetic`) → ``convert_pt2e``. The result runs in eager
  mode (quantise / dequantise pairs around float kernels: a reference, slow) and is meant for
  ``torch.compile`` (inductor), which fuses the pairs into int8 kernels.
* **int8, ONNX Runtime** (:func:`quantize_onnx`): ``onnxruntime.quantization.quantize_static`` (QDQ) on an
  exported file, calibrated on the same scenes.

How fast and how far from float32 each is on a given CPU is what ``python -m benchmarks.deploy`` measures (README,
"Deploy"): on CPUs without bfloat16 or VNNI instructions some of these are slower than float32.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["as_plain_layers", "bfloat16_autocast", "one_partition_per_call", "calibration_batches", "quantize_onnx", "quantize_pt2e", "to_bfloat16"]


def bfloat16_autocast(device_type: str = "cpu") -> contextlib.AbstractContextManager:
    """``with bfloat16_autocast(): model(pixel_values)``: autocast to bfloat16 (the weights stay float32)."""
    return torch.autocast(device_type, dtype=torch.bfloat16)


def to_bfloat16(model: nn.Module) -> nn.Module:
    """A bfloat16 copy of ``model`` in eval mode; feed it bfloat16 ``pixel_values``."""
    return copy.deepcopy(model).to(torch.bfloat16).eval()


def calibration_batches(
    processor, *, num_batches: int = 4, batch_size: int = 2, size: tuple[int, int] = (512, 512), num_labels: int = 8,
    seed: int = 0,
) -> list[torch.Tensor]:
    """``num_batches`` normalised ``(batch_size, 3, H, W)`` batches of synthetic training scenes
    (:class:`offseg_hf.data.synthetic.SyntheticScenes` at ``size``), normalised by ``processor``."""
    from offseg_hf.data.synthetic import SyntheticScenes

    scenes = SyntheticScenes(num_labels=num_labels, image_size=size, seed=seed)
    batches = []
    for first in range(0, num_batches * batch_size, batch_size):
        images = [scenes.generate(index, "train")[0] for index in range(first, first + batch_size)]
        batches.append(processor(images=images, do_resize=False, return_tensors="pt")["pixel_values"])
    return batches


def as_plain_layers(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose subclasses of ``nn.Conv2d`` / ``nn.Linear`` are plain ``nn.Conv2d`` / ``nn.Linear``.

    Every such subclass in this package computes its base layer's function: some only change the initialisation
    (``OffSegKernelEncoder``…), others run it as a matrix product for speed (``PointwiseConv2d`` and its
    subclasses). PT2E quantisers find their layers by the
    exact module type (``get_source_partitions(graph, [nn.Conv2d, F.conv2d])``) and would leave the subclasses in
    float32."""
    model = copy.deepcopy(model)
    for module in model.modules():
        for base in (nn.Conv2d, nn.Linear):
            if type(module) is not base and isinstance(module, base):
                module.__class__ = base
    return model


def one_partition_per_call(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Give every operator its own source partition (in place).

    PT2E quantisers find layers and fusion patterns by ``get_source_partitions``, which groups the nodes of a
    module by its qualified name (``nn_module_stack`` of a non-strict export): a module called twice (FreqFusion's
    ``lowpass_encoder`` runs on the high- and on the low-res map) becomes one partition with two outputs, which
    ``X86InductorQuantizer`` rejects (``ValueError: conv partition has more than one output node``, or ``Input
    partition has more than one output node`` in its conv+add pattern). Every layer quantised here lowers to a
    single aten operator per call, so one partition per operator is one partition per call.
    """
    for node in graph_module.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op == "call_function" and stack:
            key, (name, kind) = list(stack.items())[-1]
            stack[key] = (f"{name}:{node.name}", kind)
    return graph_module


def quantize_pt2e(model: nn.Module, batches: Sequence[torch.Tensor]) -> torch.fx.GraphModule:
    """int8 static quantisation of the whole model with PT2E (torchao) for x86 CPUs.

    Args:
        model: a segmentation model (``model(pixel_values=...).logits``), float32, eval mode (not modified: the
            export runs on :func:`as_plain_layers`'s copy).
        batches: calibration inputs (:func:`calibration_batches`); the first one is also the traced example, so the
            quantised module takes inputs of its shape.

    Returns:
        The converted module: ``quantized(pixel_values)`` → logits ``(B, K, h, w)``. Run it as is (reference
        arithmetic) or through ``torch.compile`` for int8 kernels.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from offseg_hf.deploy.onnx_export import LogitsNetwork
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    with torch.no_grad():
        exported = torch.export.export(LogitsNetwork(as_plain_layers(model).eval()), (batches[0],)).module()
        one_partition_per_call(exported)
        prepared = prepare_pt2e(exported, quantizer)
        for batch in batches:
            prepared(batch)
        return convert_pt2e(prepared)


def quantize_onnx(source: str | os.PathLike, target: str | os.PathLike, batches: Sequence[torch.Tensor]) -> Path:
    """int8 static (QDQ) quantisation of an exported ONNX file with ONNX Runtime's quantiser, calibrated on
    ``batches``; the metadata is kept. Returns ``target``."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from offseg_hf.deploy.onnx_runtime import METADATA_KEY
    from offseg_hf.training.checkpoints import atomic_output

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.inputs: Iterator = iter({"pixel_values": batch.numpy().astype(np.float32)} for batch in batches)

        def get_next(self):
            return next(self.inputs, None)

    target = Path(target)
    metadata = {p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props}
    with atomic_output(target) as temporary:
        prepared = temporary.with_name(temporary.stem + ".pre.onnx")
        try:
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(temporary), Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
        finally:
            prepared.unlink(missing_ok=True)
        quantized = onnx.load(str(temporary))
        if METADATA_KEY in metadata and not any(p.key == METADATA_KEY for p in quantized.metadata_props):
            entry = quantized.metadata_props.add()
            entry.key, entry.value = METADATA_KEY, metadata[METADATA_KEY]
            onnx.save(quantized, str(temporary))
    return target
