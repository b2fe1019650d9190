"""Run an ONNX file written by :func:`offseg_hf.deploy.export_onnx` with ONNX Runtime.

:class:`OnnxSegmenter` is the network of an exported file: ``segmenter(pixel_values=...)`` takes the normalised
``(B, 3, H, W)`` float32 batch and returns the ``(B, K, h, w)`` logits as a NumPy array, so it can stand in for the
PyTorch model wherever a network is called: :func:`offseg_hf.segment_image` and
:func:`offseg_hf.inference.predict.predict_files` (``offseg predict --onnx FILE.onnx``) run their resize, sliding
windows and test-time augmentation unchanged and only swap the network call. Its ``config.id2label`` and
:meth:`OnnxSegmenter.image_processor` come from the file's metadata (see
:data:`offseg_hf.deploy.onnx_export.METADATA_KEY`).

This module imports only NumPy and ``onnxruntime`` (no torch): the network runs without PyTorch. The protocol
around it (``offseg predict``'s resize, windows and TTA, :mod:`offseg_hf.inference.segment`) is written with
torch tensors, so ``offseg predict --onnx`` still needs torch installed for that part.

Example:

```python
>>> from offseg_hf.deploy.onnx_runtime import OnnxSegmenter
>>> segmenter = OnnxSegmenter("offseg-t.onnx")
>>> logits = segmenter(pixel_values=batch)  # (B, 3, H, W) float32 -> (B, K, ⌈H/4⌉, ⌈W/4⌉)
>>> segmenter.config.id2label[0], segmenter.metadata["preprocessing"]["image_mean"]
```
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

__all__ = ["METADATA_KEY", "OnnxSegmenter", "read_metadata"]

METADATA_KEY = "offseg"
"""Key of the JSON metadata entry (``metadata_props``) of an exported file."""


def read_metadata(session) -> dict:
    """The JSON metadata an :func:`~offseg_hf.deploy.export_onnx` file carries (``{}`` for other ONNX files)."""
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    return json.loads(text) if text else {}


class OnnxSegmenter:
    """An exported segmentation network in an ONNX Runtime session.

    Args:
        path: the ``.onnx`` file.
        providers: ONNX Runtime execution providers (default: CPU).
        threads: intra-op threads of the session (default: ONNX Runtime's choice).
        spin: whether idle intra-op threads busy-wait for the next run (ONNX Runtime's default, lowest latency
            when the session has the CPU to itself); ``False`` frees the cores between runs, for a process that
            also computes with PyTorch (benchmarks interleaving both).

    Attributes:
        metadata: the file's metadata (:func:`read_metadata`): ``id2label``, ``preprocessing``, ``protocol``, …
        config: ``SimpleNamespace(id2label=...)``, what :func:`offseg_hf.inference.predict.prediction_settings`
            reads from a model.
        input_name, output_name: the graph's input and output names (``pixel_values``, ``logits``).
        input_shape: the input's dimensions, ``None`` for dynamic ones.
    """

    def __init__(
        self, path: str | Path, providers: list[str] | None = None, threads: int | None = None, spin: bool = True
    ):
        import onnxruntime

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX file not found: {path}")
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = onnxruntime.InferenceSession(
                str(path), options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime raises its own exception types
            raise ValueError(f"{path}: ONNX Runtime cannot load this file: {error}") from error
        self.path = path
        self.metadata = read_metadata(self.session)
        id2label = self.metadata.get("id2label")
        if not id2label:
            raise ValueError(f"{path}: no {METADATA_KEY!r} metadata with id2label; export the file with `offseg export`")
        self.config = SimpleNamespace(id2label={int(k): v for k, v in id2label.items()})
        (graph_input,), graph_output = self.session.get_inputs(), self.session.get_outputs()[0]
        self.input_name, self.output_name = graph_input.name, graph_output.name
        self.input_shape = tuple(dim if isinstance(dim, int) else None for dim in graph_input.shape)

    def __call__(self, pixel_values) -> np.ndarray:
        """``(B, 3, H, W)`` float32 (a NumPy array or a CPU tensor) → ``(B, K, h, w)`` float32 logits."""
        pixel_values = np.ascontiguousarray(np.asarray(pixel_values, dtype=np.float32))
        fixed = [(axis, size) for axis, size in enumerate(self.input_shape) if size is not None]
        if pixel_values.ndim != 4 or any(pixel_values.shape[axis] != size for axis, size in fixed):
            expected = ", ".join("any" if size is None else str(size) for size in self.input_shape)
            raise ValueError(
                f"{self.path.name} takes pixel_values of shape ({expected}), got {pixel_values.shape}"
                + ("; export with --dynamic-size to serve other sizes" if self.input_shape[2:] != (None, None) else "")
            )
        return self.session.run([self.output_name], {self.input_name: pixel_values})[0]

    def image_processor(self):
        """The image processor the model was exported with (``SegformerImageProcessor`` from the stored
        ``preprocessor_config``): normalisation and resize of :func:`offseg_hf.segment_image`."""
        from transformers import SegformerImageProcessor

        settings = dict(self.metadata.get("image_processor") or {})
        if not settings:
            raise ValueError(f"{self.path}: its metadata has no image_processor settings")
        for key in ("image_processor_type", "processor_class", "auto_map"):
            settings.pop(key, None)
        return SegformerImageProcessor(**settings)
