"""Export a segmentation model to ONNX (``offseg export``, :func:`export_onnx`), verified in ONNX Runtime.

The file has one input, ``pixel_values (batch, 3, height, width)`` float32 (normalised as the model's image
processor does), and one output, ``logits (batch, num_labels, h, w)`` float32. Batch is always dynamic; with
``dynamic_size=True`` height and width are too: one file serves every size from 33 pixels up (OffSeg's zero
padding to a multiple of 32, the bicubic resize of EfficientFormerV2's attention biases to the actual token
counts and the crop of the logits to ``⌈H/4⌉ × ⌈W/4⌉`` are all inside the graph). Without it the file serves the
traced size only.

The exporter is ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` then translation to ONNX); every model
type this package makes exports (OffSeg T/B/L, SegFormer + offset learning, SegNeXt with or without offset
learning), and so does transformers' ``SegformerForSemanticSegmentation``. The file's metadata
(``metadata_props["offseg"]``, JSON, :data:`~offseg_hf.deploy.onnx_runtime.METADATA_KEY`) carries what a runtime
needs to reproduce the preprocessing: mean / std, the keep-ratio resize rule of the test protocol, the size
divisor, ``id2label`` and the full image-processor settings.

The file is written under a temporary name in the target folder and renamed into place only after the
verification passed (:func:`verify_onnx`: ONNX Runtime against PyTorch eager at the traced size and two others,
one of them not a multiple of 32): a failed export or verification leaves no file behind.

Example:

```python
>>> from offseg_hf import OffSegConfig, OffSegForSemanticSegmentation, export_onnx
>>> model = OffSegForSemanticSegmentation(OffSegConfig.from_preset("offseg-t", num_labels=150))
>>> report = export_onnx(model, "offseg-t.onnx", dynamic_size=True)
>>> print(report.summary())
```
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from offseg_hf.deploy.onnx_runtime import METADATA_KEY, OnnxSegmenter

__all__ = [
    "DEFAULT_OPSET",
    "ExportError",
    "ExportReport",
    "LogitsNetwork",
    "SizeCheck",
    "default_verify_sizes",
    "export_onnx",
    "onnx_metadata",
    "verify_onnx",
]

DEFAULT_OPSET = 20
"""ONNX opset of the exported graph: 20 has the ``Gelu`` operator (the backbone's MLPs), which ONNX Runtime runs as
one kernel where opset 18's ``Erf`` formula is five nodes (OffSeg-T at 512²: 0.93x the opset-18 time)."""

MIN_DYNAMIC_SIDE = 33
"""Smallest height / width a dynamic-size file serves (at 32 pixels and below the stride-32 map has a single
pixel, which ``torch.export`` specialises on)."""


class ExportError(RuntimeError):
    """The export or its verification failed; the message names the step, the file and the numbers."""


@dataclass
class SizeCheck:
    """ONNX Runtime against PyTorch eager at one input size.

    The reference is the model run in float64 (the exact function up to ~1e-12): float32 eager is itself a
    rounding of it, and on OffSeg-T at 512² with random weights it is 1.7e-4 away from it (the LayerNorm over the K
    class scores rescales the rounding of the scores), where ONNX Runtime is 3e-5 away.

    Attributes:
        size: ``(height, width)``; batch: the batch size.
        max_abs_diff: largest absolute difference of the ONNX Runtime logits from the float64 eager ones.
        eager_max_abs_diff: the same for float32 eager (PyTorch's own rounding, for comparison).
        argmax_agreement: fraction of logit pixels whose arg-max class is that of float32 eager.
        ok: ``max_abs_diff`` and ``argmax_agreement`` within the tolerances of the check.
    """

    size: tuple[int, int]
    batch: int
    max_abs_diff: float
    eager_max_abs_diff: float
    argmax_agreement: float
    ok: bool

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        return (f"{self.size[0]}x{self.size[1]} batch {self.batch}: max abs diff {self.max_abs_diff:.2e} "
                f"(float32 eager: {self.eager_max_abs_diff:.2e}) from float64 eager, arg-max agreement with float32 "
                f"eager {100 * self.argmax_agreement:.3f} % [{verdict}]")


@dataclass
class ExportReport:
    """Outcome of :func:`export_onnx`.

    Attributes:
        path: the written file.
        export_seconds: ``torch.onnx.export`` wall time (tracing, translation, graph optimisation).
        verify_seconds: wall time of the verification.
        checks: the :class:`SizeCheck` of every verified size (empty without verification).
        num_nodes: nodes of the ONNX graph.
        metadata: the JSON metadata written into the file.
    """

    path: Path
    export_seconds: float
    verify_seconds: float = 0.0
    checks: list[SizeCheck] = field(default_factory=list)
    num_nodes: int = 0
    metadata: dict = field(default_factory=dict)

    def summary(self) -> str:
        dynamic = self.metadata.get("input", {}).get("dynamic", {})
        sizes = "any height/width >= 33" if dynamic.get("height") else "size {}x{} only".format(
            *self.metadata.get("input", {}).get("traced_size", ("?", "?")))
        lines = [f"exported {self.path} ({self.num_nodes} nodes, {self.path.stat().st_size / 2**20:.1f} MiB, {sizes}, "
                 f"dynamic batch) in {self.export_seconds:.1f} s"]
        if self.checks:
            lines.append(f"verified in ONNX Runtime against PyTorch eager ({self.verify_seconds:.1f} s):")
            lines.extend(f"  {check.line()}" for check in self.checks)
        else:
            lines.append("not verified (--no-verify)")
        return "\n".join(lines)


class LogitsNetwork(nn.Module):
    """``pixel_values (B, 3, H, W)`` → ``logits``: the model's output reduced to its logits (a plain tensor for
    ``torch.export``; also the traced module of :func:`offseg_hf.deploy.quantization.quantize_pt2e`). With ``dtype``
    (float16 for ``--fp16``) the input is cast to it and the logits come back as float32."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.dtype is None:
            return self.model(pixel_values=pixel_values).logits
        return self.model(pixel_values=pixel_values.to(self.dtype)).logits.float()


def default_verify_sizes(size: tuple[int, int], dynamic_size: bool) -> list[tuple[int, int]]:
    """The sizes :func:`export_onnx` verifies: the traced one, and for a dynamic file two more, one a multiple of
    32 with another aspect ratio (512² → 384×640) and one that is not a multiple of 32 (512² → 333×499)."""
    height, width = size
    if not dynamic_size:
        return [size]
    multiple = (max(64, 32 * round(0.75 * height / 32)), max(64, 32 * round(1.25 * width / 32)))
    odd = (max(MIN_DYNAMIC_SIDE, round(0.65 * height) | 1), max(MIN_DYNAMIC_SIDE + 2, round(0.977 * width) - 1 | 1))
    return [size, multiple, odd]


def onnx_metadata(model: nn.Module, processor, *, size: tuple[int, int], dynamic_size: bool, opset: int, fp16: bool,
                  logits_size: tuple[int, int]) -> dict:
    """The JSON metadata of an exported file (see the module docstring)."""
    from importlib.metadata import PackageNotFoundError, version

    from offseg_hf.inference.predict import prediction_settings

    try:
        package_version = version("offseg-hf")
    except PackageNotFoundError:  # a source checkout on PYTHONPATH
        package_version = None

    settings = prediction_settings(model)
    processor_settings = processor.to_dict()
    model_type = getattr(model.config, "model_type", type(model).__name__)
    return {
        "format_version": 1,
        "model_type": model_type,
        "id2label": {str(k): v for k, v in settings.id2label.items()},
        "input": {
            "name": "pixel_values", "layout": "NCHW", "dtype": "float32",
            "dynamic": {"batch": True, "height": dynamic_size, "width": dynamic_size},
            "traced_size": list(size), "min_size": MIN_DYNAMIC_SIDE if dynamic_size else None,
        },
        "output": {"name": "logits", "layout": "NCHW", "dtype": "float32",
                   "stride": [size[0] / logits_size[0], size[1] / logits_size[1]]},
        "preprocessing": {
            "color": "RGB, 8 bit",
            "do_rescale": processor_settings.get("do_rescale", True),
            "rescale_factor": processor_settings.get("rescale_factor", 1 / 255),
            "image_mean": processor_settings.get("image_mean"),
            "image_std": processor_settings.get("image_std"),
            "resize": "keep ratio: factor min(max(scale) / max(H, W), min(scale) / min(H, W)), sides rounded half up "
                      "(mmcv imrescale), bilinear; logits resized bilinearly to the image size before the arg-max",
            "scale": list(settings.protocol.scale),
            "size_divisor": 32 if model_type == "offseg" else 1,
            "padding": "none needed: the graph zero-pads to the size divisor and crops the logits back"
            if model_type == "offseg" else "none",
        },
        "protocol": settings.protocol_record,
        "image_processor": processor_settings,
        "exporter": {"offseg_hf": package_version, "torch": torch.__version__, "opset": opset,
                     "compute_dtype": "float16" if fp16 else "float32"},
    }


def check_output_path(path: str | os.PathLike) -> Path:
    """``path`` as a file the export can write; ``ValueError`` naming the problem (a folder, no write permission)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"output path {path} is a folder; give a file name such as {path / 'model.onnx'}")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create the output folder {folder}: {error.strerror or error}") from error
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {path}: no write permission in {folder}")
    return path


def verify_onnx(
    path: str | os.PathLike,
    model: nn.Module,
    sizes: Sequence[tuple[int, int]],
    *,
    atol: float = 1e-4,
    min_agreement: float = 0.999,
    seed: int = 0,
) -> list[SizeCheck]:
    """Run ``path`` in ONNX Runtime and ``model`` in PyTorch eager (float32, and a float64 copy as the reference) on
    the same random inputs and compare (see :class:`SizeCheck`).

    The first size is checked with batch 2, the others with batch 1 (so the dynamic batch is exercised too).
    Inputs are standard-normal, as normalised images roughly are.

    Returns:
        One :class:`SizeCheck` per size (``ok`` when the max abs diff is ≤ ``atol`` and the arg-max agreement
        ≥ ``min_agreement``).
    """
    segmenter = OnnxSegmenter(path)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    exact = copy.deepcopy(model).to(torch.float64)
    checks = []
    for index, (height, width) in enumerate(sizes):
        batch = 2 if index == 0 else 1
        pixel_values = torch.randn(batch, 3, height, width, generator=generator)
        with torch.no_grad():
            eager = model(pixel_values=pixel_values.to(device)).logits.float().cpu().numpy()
            reference = exact(pixel_values=pixel_values.to(device, torch.float64)).logits.cpu().numpy()
        got = segmenter(pixel_values.numpy())
        if got.shape != eager.shape:
            raise ExportError(f"{path}: at {height}x{width} ONNX Runtime returned logits {got.shape}, PyTorch {eager.shape}")
        diff = float(np.abs(got - reference).max())
        eager_diff = float(np.abs(eager - reference).max())
        agreement = float((got.argmax(1) == eager.argmax(1)).mean())
        checks.append(SizeCheck((height, width), batch, diff, eager_diff, agreement,
                                diff <= atol and agreement >= min_agreement))
    return checks


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    processor=None,
    dynamic_size: bool = True,
    size: tuple[int, int] = (512, 512),
    opset: int = DEFAULT_OPSET,
    fp16: bool = False,
    verify: bool = True,
    verify_sizes: Sequence[tuple[int, int]] | None = None,
    atol: float | None = None,
    min_agreement: float | None = None,
    optimize: bool = False,
) -> ExportReport:
    """Export ``model`` to the ONNX file ``path`` and verify it in ONNX Runtime.

    Args:
        model: a semantic-segmentation model called as ``model(pixel_values=...)`` with ``logits`` in its output
            (every model of this package, transformers' SegFormer). It is put in eval mode.
        path: the ``.onnx`` file to write (its folder is created).
        processor: the model's image processor, recorded in the metadata (default:
            :func:`offseg_hf.build_image_processor`, ADE20K).
        dynamic_size: dynamic height and width (any size ≥ 33); else the file serves ``size`` only.
        size: ``(height, width)`` of the traced example (batch 2).
        opset: ONNX opset.
        fp16: compute in float16 inside the graph (inputs and outputs stay float32).
        verify: compare ONNX Runtime with PyTorch eager (:func:`verify_onnx`) before the file is renamed into place.
        verify_sizes: the sizes to verify (default: :func:`default_verify_sizes`).
        atol, min_agreement: verification tolerances (default: 1e-4 and 99.9 % in float32; 5e-2 and 99 % with
            ``fp16``).
        optimize: run ``torch.onnx``'s graph optimiser (constant folding, fusions) before saving: a graph of
            about a quarter of the nodes (OffSeg-T: 2,675 instead of 11,602), but three times the export time
            (159 s instead of 46 s for OffSeg-T on a 2-core CPU) and no faster in ONNX Runtime, which optimises the
            graph itself when it loads it (0.43 s either way at 512²).

    Returns:
        An :class:`ExportReport`.

    Raises:
        ValueError: the output path cannot be written (checked before the export starts).
        ExportError: the export specialised on a size it should not, or the verification failed; no file is left.
    """
    import onnx

    from offseg_hf.training.checkpoints import atomic_output

    path = check_output_path(path)
    if processor is None:
        from offseg_hf.inference.image_processing_offseg import build_image_processor

        processor = build_image_processor()
    model = model.eval()
    dtype = torch.float16 if fp16 else torch.float32
    network = LogitsNetwork(copy.deepcopy(model).to(dtype) if fp16 else model, dtype).eval()
    device = next(model.parameters()).device
    example = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0)).to(device)
    auto = torch.export.Dim.AUTO
    dynamic_shapes = {"pixel_values": {0: auto, 2: auto, 3: auto} if dynamic_size else {0: auto}}

    start = time.perf_counter()
    with torch.no_grad():
        try:
            logits_size = tuple(network(example).shape[-2:])
            program = torch.onnx.export(
                network, (example,), dynamo=True, dynamic_shapes=dynamic_shapes, opset_version=opset,
                input_names=["pixel_values"], output_names=["logits"], optimize=optimize, verify=False, report=False,
            )
        except Exception as error:  # torch.export / translation errors: many types
            raise ExportError(f"export of {type(model).__name__} failed: {type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}") from error
    export_seconds = time.perf_counter() - start
    graph_input = program.model.graph.inputs[0]
    symbolic = [not isinstance(dim, int) for dim in graph_input.shape]
    if not symbolic[0] or (dynamic_size and not all(symbolic[2:])):
        raise ExportError(f"the exported graph specialised its input to {list(graph_input.shape)}: "
                          "a part of the model branches on the batch or image size")
    metadata = onnx_metadata(model, processor, size=size, dynamic_size=dynamic_size, opset=opset, fp16=fp16,
                             logits_size=logits_size)
    program.model.metadata_props[METADATA_KEY] = json.dumps(metadata, ensure_ascii=False)

    report = ExportReport(path=path, export_seconds=export_seconds, metadata=metadata)
    with atomic_output(path) as temporary:
        program.save(str(temporary))
        report.num_nodes = len(onnx.load(str(temporary), load_external_data=False).graph.node)
        if verify:
            start = time.perf_counter()
            report.checks = verify_onnx(
                temporary, model, verify_sizes or default_verify_sizes(size, dynamic_size),
                atol=atol if atol is not None else (5e-2 if fp16 else 1e-4),
                min_agreement=min_agreement if min_agreement is not None else (0.99 if fp16 else 0.999),
            )
            report.verify_seconds = time.perf_counter() - start
            failed = [check for check in report.checks if not check.ok]
            if failed:
                raise ExportError(f"verification of the ONNX file failed (no file written to {path}):\n"
                                  + "\n".join(check.line() for check in report.checks))
    return report
