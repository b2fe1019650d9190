"""Deployment without PyTorch at run time: ONNX export verified in ONNX Runtime, the ONNX Runtime network for
``offseg predict --onnx``, and CPU quantisation (bfloat16, int8).

* :mod:`offseg_hf.deploy.onnx_export`: :func:`~offseg_hf.deploy.onnx_export.export_onnx` (``offseg export``);
* :mod:`offseg_hf.deploy.onnx_runtime`: :class:`~offseg_hf.deploy.onnx_runtime.OnnxSegmenter` (NumPy and
  onnxruntime only);
* :mod:`offseg_hf.deploy.quantization`: bfloat16 and int8 (PT2E static with synthetic calibration scenes,
  ONNX Runtime's quantiser on an exported file).

Needs the ``onnx`` extra (``pip install "offseg-hf[onnx]"``) for ONNX and the ``quantization`` extra (torchao)
for PT2E.
"""
