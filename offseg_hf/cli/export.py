"""``offseg export DIR --format onnx [--dynamic-size] [--opset N] [--fp16] [--optimize] [--out FILE] [--no-verify]``.

Exports a saved model folder (any model type of this package) to an ONNX file with input ``pixel_values (batch,
3, height, width)`` and output ``logits``; batch always dynamic, height and width with ``--dynamic-size``. The file
is verified in ONNX Runtime against PyTorch eager at the traced size and two others (one not a multiple of 32):
the max abs difference and the arg-max agreement of every size are printed, and when one is out of tolerance the
command fails and writes no file. The preprocessing (mean/std, resize rule, size divisor, id2label) is written
into the file's metadata. The work is done by :func:`offseg_hf.deploy.onnx_export.export_onnx`.

Exit status: 0 when the file was written (and verified), 1 when the export or the verification failed, 2 for an
unsupported format or a folder that does not hold a model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = """
  offseg export outputs/quickstart --format onnx --dynamic-size
  offseg export offseg-t-ade20k --format onnx --dynamic-size --out deploy/offseg-t.onnx
  offseg export offseg-t-ade20k --format onnx --size 512 512 --fp16 --out offseg-t-512-fp16.onnx
"""

FORMATS = ("onnx",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="DIR", help="model folder (config.json + weights) or Hub id")
    parser.add_argument("--format", default="onnx", metavar="FORMAT", help="export format; only onnx (default: onnx)")
    parser.add_argument("--dynamic-size", action="store_true",
                        help="dynamic height and width: one file for every image size >= 33 (default: the --size only)")
    parser.add_argument("--size", type=int, nargs=2, default=(512, 512), metavar=("HEIGHT", "WIDTH"),
                        help="input size traced (and, without --dynamic-size, the only size the file serves) (default: 512 512)")
    parser.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset (default: 20)")
    parser.add_argument("--fp16", action="store_true",
                        help="compute in float16 inside the graph; inputs and outputs stay float32 (default: float32)")
    parser.add_argument("--optimize", action="store_true",
                        help="run torch.onnx's graph optimiser: a smaller graph, three times the export time, the same "
                        "ONNX Runtime speed (default: off)")
    parser.add_argument("--out", default=None, metavar="FILE", help="output file (default: DIR/model.onnx)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the ONNX Runtime check against PyTorch (default: verify at three sizes)")


def run(args: argparse.Namespace) -> int:
    if args.format.lower() not in FORMATS:
        print(f"offseg export: unsupported --format {args.format!r}; supported: {', '.join(FORMATS)}", file=sys.stderr)
        return 2
    if min(args.size) < 33:
        print(f"offseg export: --size needs sides of at least 33 pixels, got {args.size[0]} {args.size[1]}", file=sys.stderr)
        return 2
    if args.out is None and not Path(args.model).is_dir():
        print(f"offseg export: {args.model} is not a local folder; give the output file with --out", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out is not None else Path(args.model) / "model.onnx"

    from offseg_hf.deploy.onnx_export import DEFAULT_OPSET, check_output_path, export_onnx
    from offseg_hf.inference.predict import ModelLoadError, load_model

    check_output_path(out)  # before the model loads: an unwritable target fails at once
    try:
        model, processor = load_model(args.model, device="cpu")
    except ModelLoadError as error:
        print(f"offseg export: {error}", file=sys.stderr)
        return 2
    report = export_onnx(
        model, out, processor=processor, dynamic_size=args.dynamic_size, size=tuple(args.size),
        opset=args.opset or DEFAULT_OPSET, fp16=args.fp16, verify=args.verify, optimize=args.optimize,
    )
    print(report.summary())
    return 0
