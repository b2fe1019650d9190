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

__all__ = [
    "ONNX_QUANTIZED_OP_TYPES", "as_plain_layers", "bfloat16_autocast", "calibration_batches", "offset_learning_modules",
    "one_partition_per_call", "quantize_onnx", "quantize_pt2e", "to_bfloat16",
]


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


def offset_learning_modules(model: nn.Module) -> list[str]:
    """The qualified names of ``model``'s :class:`~offseg_hf.models.offset_learning.OffsetLearning` modules (the
    int8 paths keep them in float)."""
    from offseg_hf.models.offset_learning import OffsetLearning

    return [name for name, module in model.named_modules() if isinstance(module, OffsetLearning)]


def _unannotate_modules(quantizer, graph_module: torch.fx.GraphModule, names: Sequence[str], prefix: str) -> None:
    """``quantizer.set_module_name_qconfig(…, None)`` for every operator inside the modules ``names`` (qualified
    names in the model; ``prefix`` is the wrapper's attribute). Matched on the export's ``nn_module_stack``, where
    :func:`one_partition_per_call` renamed each operator's innermost entry ``"{module}:{node}"``.

    Raises:
        ValueError: a name matches no operator of the exported graph (the message names it).
    """
    stack_names = {
        entry[0] for node in graph_module.graph.nodes for entry in (node.meta.get("nn_module_stack") or {}).values()
    }
    for name in names:
        full = f"{prefix}{name}"
        matched = sorted(s for s in stack_names if s == full or s.startswith(full + ":"))
        if not matched:
            raise ValueError(
                f"quantize_pt2e: keep_float names {name!r}, but no operator of the exported graph belongs to a module "
                f"of that name (modules are named as in model.named_modules(), e.g. 'offset_learning')"
            )
        for stack_name in matched:
            quantizer.set_module_name_qconfig(stack_name, None)


def quantize_pt2e(
    model: nn.Module, batches: Sequence[torch.Tensor], *, keep_float: Sequence[str] | None = None
) -> torch.fx.GraphModule:
    """int8 static quantisation with PT2E (torchao) for x86 CPUs: every convolution and ``nn.Linear`` except those
    of ``keep_float``.

    Kept in float by default: offset learning (every :class:`~offseg_hf.models.offset_learning.OffsetLearning`,
    :func:`offset_learning_modules`: its two projections, ``class_offset_proj`` and ``feature_offset_proj``). Their
    outputs are added to the class embeddings and mixed into all K class scores just before the LayerNorm over
    classes, so their rounding moves every logit of a pixel at once. Measured on OffSeg-T (random weights, 150
    classes, 512², two synthetic scenes, the eager reference of the converted module) on a 2-core AMD EPYC (AVX2):
    arg-max agreement with float32 91.6 % with them quantised, 94.2 % with them in float (mean |Δlogit| 0.035 →
    0.026). They are two K×C / C×C products (K = classes): no measurable time in float. Leaving the whole decoder in
    float (94.7 %) would add little accuracy for most of the convolution work.

    Args:
        model: a segmentation model (``model(pixel_values=...).logits``), float32, eval mode (not modified: the
            export runs on :func:`as_plain_layers`'s copy).
        batches: calibration inputs (:func:`calibration_batches`); the first one is also the traced example, so the
            quantised module takes inputs of its shape.
        keep_float: qualified module names (as in ``model.named_modules()``) whose operators stay float32
            (default: :func:`offset_learning_modules`; ``()`` quantises every convolution and linear).

    Returns:
        The converted module: ``quantized(pixel_values)`` → logits ``(B, K, h, w)``. Run it as is (reference
        arithmetic) or through ``torch.compile`` for int8 kernels.

    Raises:
        ValueError: a ``keep_float`` name matches no operator of the model.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from offseg_hf.deploy.onnx_export import LogitsNetwork
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86

    keep_float = offset_learning_modules(model) if keep_float is None else list(keep_float)
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    with torch.no_grad():
        exported = torch.export.export(LogitsNetwork(as_plain_layers(model).eval()), (batches[0],)).module()
        one_partition_per_call(exported)
        _unannotate_modules(quantizer, exported, keep_float, prefix="model.")  # LogitsNetwork.model
        prepared = prepare_pt2e(exported, quantizer)
        for batch in batches:
            prepared(batch)
        return convert_pt2e(prepared)


#: Operator types :func:`quantize_onnx` quantises: the convolutions and matrix products with int8 kernels, and the
#: operators that only move or select 8-bit values (run on uint8 tensors where their input is quantised: CARAFE's and
#: the resampler's gathers, padding, reshapes…), which quantisation leaves exact. Not listed, so float32: Softmax,
#: Add, Mul, LayerNormalization, InstanceNormalization, Sigmoid (see :func:`quantize_onnx` for what each costs).
ONNX_QUANTIZED_OP_TYPES = (
    "Conv", "MatMul",
    "Gather", "GatherElements", "Reshape", "Transpose", "Slice", "Concat", "Pad", "Resize", "Squeeze", "Unsqueeze",
    "Flatten", "Split", "AveragePool", "MaxPool", "Clip", "Relu",
)

_NAME_SCOPES = "pkg.torch.onnx.name_scopes"  # per-node module path that torch.onnx's exporter records


def _nodes_in_modules(model, modules: Sequence[str]) -> list[str]:
    """Names of the nodes of ``model`` (an :class:`onnx.ModelProto` written by :func:`offseg_hf.export_onnx`) that
    belong to a module whose qualified name ends with one of ``modules`` (matched on the exporter's name scopes)."""
    import ast

    names = []
    for node in model.graph.node:
        scope = next((p.value for p in node.metadata_props if p.key == _NAME_SCOPES), None)
        if scope is None:
            continue
        paths = ast.literal_eval(scope) if scope.startswith("[") else [scope]
        if any(path == module or path.endswith("." + module) for path in paths for module in modules):
            names.append(node.name)
    return names


def quantize_onnx(
    source: str | os.PathLike,
    target: str | os.PathLike,
    batches: Sequence[torch.Tensor],
    *,
    op_types: Sequence[str] = ONNX_QUANTIZED_OP_TYPES,
    keep_float: Sequence[str] = ("offset_learning",),
    weight_type: str = "uint8",
) -> Path:
    """int8 static (QDQ) quantisation of an exported ONNX file with ONNX Runtime's quantiser, calibrated on
    ``batches`` (MinMax, per-tensor uint8 activations, per-channel weights); the metadata is kept. Returns
    ``target``.

    Only ``op_types`` are quantised, and nothing inside the ``keep_float`` modules. Measured on OffSeg-T (random
    weights, 150 classes, 512², two synthetic scenes; arg-max agreement with float32) on a 2-core AMD EPYC (AVX2):
    quantising every operator type ONNX Runtime can (this function's behaviour before) agreed on 48.8 % of the
    pixels (52.5 % where the int8 kernels are exact); convolutions alone (exact arithmetic), 88.0 %. Added to
    them, each of these moved the logits most and stays float32:

    * ``Softmax`` (88.0 → 58.4 %): offset learning's softmax over the pixels (alone: 62.6 %; at 512² its 16,384
      weights per class are mostly far below the 1/256 step of a uint8 output) and the backbone attention's (alone:
      73.5 %);
    * ``MatMul`` of offset learning (→ 71–76 %; the backbone's and the decoder's are harmless, 87.9 %): the
      coupled attention ``E·Wᵀ`` and the products that mix every class score just before the LayerNorm over
      classes, hence ``keep_float=("offset_learning",)``;
    * ``Add`` (→ 74.7 %): the residual sums of the backbone (74.1 %) and the decoder's ``2·x − CARAFE(x)``
      high-pass sums (73.9 %), where a uint8 grid of the sum's range loses the small differences;
    * ``LayerNormalization`` (→ 78.2 %): offset learning's LayerNorm over the K class scores, whose uint8 output
      is the logits themselves;
    * ``Mul`` (→ 86.9 %, the decoder's CARAFE products), ``InstanceNormalization`` (GroupNorm, → 87.4 %),
      ``Sigmoid``: small losses for little time.

    The gathers (CARAFE's ``carafe_by_gather``, the resampler's ``grid_sample_by_gather``), padding, reshapes,
    concatenations and resizes only move 8-bit values: quantised, they cost nothing (87.4–88.0 %).

    ``weight_type="uint8"`` (U8U8) by default: on AVX2 CPUs without VNNI ONNX Runtime runs int8 (U8S8) products
    with ``VPMADDUBSW``, whose 16-bit sums of two products saturate; there the same file agreed on 72.4 %
    (convolutions only) instead of 88.0 %. U8U8 has no saturation (88.1 %) on any CPU; ``reduce_range=True`` (7-bit
    weights, 87.6 %) would too, but costs a bit of precision everywhere. ``"int8"`` (U8S8) is exact on VNNI CPUs
    (Cascade Lake and later, Zen 4 and later) — but a file is not tied to the CPU it was made on.

    Args:
        source: a float32 ONNX file written by :func:`offseg_hf.export_onnx` (its per-node module names locate
            ``keep_float``).
        target: the quantised file to write.
        batches: calibration inputs (:func:`calibration_batches`).
        op_types: ONNX operator types to quantise (default :data:`ONNX_QUANTIZED_OP_TYPES`).
        keep_float: module names (last components of the qualified names, e.g. ``"offset_learning"``) whose nodes
            stay float32; a model without such a module simply has none.
        weight_type: ``"uint8"`` (default) or ``"int8"``.

    Raises:
        ValueError: ``weight_type`` is neither, or ``keep_float`` is given but ``source`` has no per-node module
            names (not written by :func:`offseg_hf.export_onnx`).
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from offseg_hf.deploy.onnx_runtime import METADATA_KEY
    from offseg_hf.training.checkpoints import atomic_output

    weight_types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    if weight_type not in weight_types:
        raise ValueError(f"quantize_onnx: weight_type must be 'uint8' or 'int8', got {weight_type!r}")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.inputs: Iterator = iter({"pixel_values": batch.numpy().astype(np.float32)} for batch in batches)

        def get_next(self):
            return next(self.inputs, None)

    target = Path(target)
    original = onnx.load(str(source), load_external_data=False)
    metadata = {p.key: p.value for p in original.metadata_props}
    if keep_float and not any(p.key == _NAME_SCOPES for node in original.graph.node for p in node.metadata_props):
        raise ValueError(
            f"quantize_onnx: {source} has no per-node module names ({_NAME_SCOPES!r} metadata), so the nodes of "
            f"{list(keep_float)} cannot be kept in float; export it with offseg_hf.export_onnx (offseg export), or "
            "pass keep_float=() to quantise them too"
        )
    excluded = _nodes_in_modules(original, keep_float)
    del original
    with atomic_output(target) as temporary:
        prepared = temporary.with_name(temporary.stem + ".pre.onnx")
        try:
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(temporary), Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=weight_types[weight_type], per_channel=True,
                            op_types_to_quantize=list(op_types), nodes_to_exclude=excluded)
        finally:
            prepared.unlink(missing_ok=True)
        quantized = onnx.load(str(temporary))
        if METADATA_KEY in metadata and not any(p.key == METADATA_KEY for p in quantized.metadata_props):
            entry = quantized.metadata_props.add()
            entry.key, entry.value = METADATA_KEY, metadata[METADATA_KEY]
            onnx.save(quantized, str(temporary))
    return target
