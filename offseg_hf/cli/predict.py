"""``offseg predict IMAGE_OR_DIR... (--model PATH | --onnx FILE) --out DIR [--mode slide] [--tta] [--device DEVICE]``.

Writes, per image, ``<name>_labels.png`` (palette PNG of class indices), ``<name>_overlay.png`` (image and
prediction side by side with a legend) and ``<name>.json`` (classes present and their pixel fractions), then
prints a summary. Exit status: 0 when every image was segmented, 1 when some input failed (the others are
still written), 2 when the model cannot be loaded or the arguments are invalid. The work is done by
:func:`offseg_hf.inference.predict.predict_files`; with ``--onnx`` the network is an exported file run in ONNX
Runtime (:class:`offseg_hf.deploy.onnx_runtime.OnnxSegmenter`) and everything around it stays the same.
"""

from __future__ import annotations

import argparse
import sys

EXAMPLES = """
  offseg predict photo.jpg photos/ --model offseg-t-ade20k --out predictions
  offseg predict street.jpg --model offseg-t-ade20k --out predictions --mode slide --tta --device cuda
  offseg predict outputs/quickstart/samples/val_00?.png --model outputs/quickstart --out outputs/quickstart/predictions
  offseg predict photo.jpg --onnx offseg-t.onnx --out predictions --mode slide
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or directories of images")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="PATH", help="model folder (config.json + weights) or Hub id")
    source.add_argument("--onnx", metavar="FILE", help="an ONNX file written by `offseg export`, run in ONNX Runtime "
                        "with the same resize, sliding windows and TTA (instead of --model)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument(
        "--mode", choices=("whole", "slide"), default="whole",
        help="whole image in one pass, or sliding windows as in the paper's evaluation (default: whole)",
    )
    parser.add_argument("--tta", action="store_true", help="multi-scale (0.5-1.75) + horizontal flip test-time augmentation")
    add_protocol_arguments(parser)


def add_protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """``--protocol``, ``--scale`` and ``--device`` (shared with ``offseg demo``)."""
    parser.add_argument(
        "--protocol", default=None, metavar="DATASET",
        help="test settings (resize scale, window size) of ade20k, coco-stuff, cityscapes or pascal-context "
        "(default: the dataset the model's classes come from, else ade20k)",
    )
    parser.add_argument(
        "--scale", type=int, nargs=2, default=None, metavar=("LONG", "SHORT"),
        help="override the keep-ratio resize: short side SHORT, long side at most LONG (e.g. 1024 256 for a quick CPU preview)",
    )
    parser.add_argument("--compile", action="store_true",
                        help="run the network through torch.compile (inductor): faster after the first call of each "
                        "input size, which compiles (default: off)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps … (default: cuda when available)")


def check_protocol_arguments(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` naming a bad ``--protocol`` or ``--scale``."""
    from offseg_hf.inference.segment import get_protocol

    if args.protocol is not None:
        get_protocol(args.protocol)
    if args.scale is not None and min(args.scale) < 1:
        raise ValueError(f"--scale needs two positive integers, got {args.scale[0]} {args.scale[1]}")


def load_onnx(args: argparse.Namespace):
    """``(segmenter, processor)`` of ``--onnx FILE`` (:class:`offseg_hf.deploy.onnx_runtime.OnnxSegmenter`)."""
    from offseg_hf.deploy.onnx_runtime import OnnxSegmenter

    if args.compile:
        raise ValueError("--compile applies to --model only; an ONNX file is optimised by ONNX Runtime")
    if args.device not in ("auto", "cpu"):
        raise ValueError(f"--onnx runs on ONNX Runtime's CPU provider; --device {args.device} is not supported with it")
    segmenter = OnnxSegmenter(args.onnx)
    return segmenter, segmenter.image_processor()


def run(args: argparse.Namespace) -> int:
    from offseg_hf.inference.predict import ModelLoadError, collect_images, load_model, predict_files

    try:
        check_protocol_arguments(args)
    except ValueError as error:
        print(f"offseg predict: {error}", file=sys.stderr)
        return 2
    files, missing = collect_images(args.inputs)  # before the model loads (seconds): bad inputs are reported at once
    if not files:
        for path, reason in missing:
            print(f"offseg predict: {path}: {reason}", file=sys.stderr)
        print("offseg predict: no image to segment", file=sys.stderr)
        return 2
    try:
        model, processor = (load_onnx(args) if args.onnx else
                            load_model(args.model, device=args.device, compile=args.compile))
    except (ModelLoadError, ValueError, FileNotFoundError) as error:
        print(f"offseg predict: {error}", file=sys.stderr)
        return 2

    summary = predict_files(
        args.inputs, model, processor, args.out, mode=args.mode, tta=args.tta, protocol=args.protocol,
        scale=args.scale, model_name=args.model or args.onnx, progress=not args.quiet,
    )
    print(summary.report())
    if summary.written:
        print(f"outputs in {args.out}")
    return 0 if summary.ok else 1
