"""``offseg convert``: an official checkpoint → a Transformers folder (and optionally a Hub repo).

OffSeg checkpoints (``state_dict`` with ``backbone.*``/``decode_head.*``) become
``OffSegForSemanticSegmentation`` folders, SegFormer / SegNeXt / Mask2Former-Swin (w/ offset learning) checkpoints
their own model folders; EfficientFormerV2 ImageNet checkpoints (``eformer_*.pth``, timm ``efficientformerv2_*``) and MSCAN
ImageNet checkpoints (``mscan_{t,s,b,l}``) become backbone folders. The work happens in
:func:`offseg_hf.conversion.convert.convert_any_checkpoint`; this module parses arguments and prints the outcome.
"""

from __future__ import annotations

import argparse
import sys

EXAMPLES = """
  offseg convert offseg-t_ade20k.pth offseg-t-ade20k --verify
  offseg convert eformer_s1_450.pth efficientformerv2-s1
  offseg convert mask2former_offset_learning_swin-t_ade20k.pth mask2former-swin-t-offset-ade20k --verify
  offseg convert offseg-t_ade20k.pth offseg-t-ade20k --push-to-hub USER/offseg-t-ade20k --private
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``offseg convert``."""
    parser.add_argument(
        "checkpoint",
        help="the authors' OffSeg, SegFormer, SegNeXt or Mask2Former-Swin (w/ offset learning) checkpoint, an "
        "mmsegmentation SegNeXt or Mask2Former-Swin checkpoint (.pth with 'state_dict' and 'meta'), or an EfficientFormerV2 (eformer_*.pth, timm) or MSCAN "
        "(mscan_*.pth) ImageNet checkpoint",
    )
    parser.add_argument("output_dir", help="folder to create, e.g. offseg-t-ade20k")
    parser.add_argument(
        "--dataset",
        default=None,
        help="ade20k, coco-stuff, cityscapes or pascal-context (default: decided from the number of classes)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="reload the written folder and compare its weights and logits with the original tensors (default: off)",
    )
    parser.add_argument("--verify-size", type=int, default=512, help="side of the random verification input (default 512)")
    parser.add_argument(
        "--attention-biases",
        choices=("zero", "transfer"),
        default=None,
        help="ImageNet backbones only: start the 512-layout attention biases at zero (the reference, default) or "
        "carry the 224-resolution ImageNet tables over per offset",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists (default: refuse)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="upload the folder to this Hub model repo (default: no upload)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private, with --push-to-hub (default: public)")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the cached login)")


def run(args: argparse.Namespace) -> int:
    """Convert; returns 0 on success, 1 when the checkpoint cannot be converted or the upload fails."""
    from offseg_hf.conversion import convert as conversion

    if args.private and not args.push_to_hub:
        print("offseg convert: --private needs --push-to-hub", file=sys.stderr)
        return 2
    try:
        result = conversion.convert_any_checkpoint(
            args.checkpoint,
            args.output_dir,
            dataset=args.dataset,
            verify=args.verify,
            verify_size=args.verify_size,
            attention_biases=args.attention_biases,
            overwrite=args.overwrite,
            push_to_hub=args.push_to_hub,
            private=args.private,
            token=args.token,
        )
    except (FileNotFoundError, conversion.ConversionError) as error:
        print(f"offseg convert: error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001 - upload errors (HTTP, auth) end the command with a message
        if args.push_to_hub and type(error).__module__.startswith(("huggingface_hub", "requests", "httpx")):
            print(f"offseg convert: the folder was written to {args.output_dir} but the upload failed: {error}", file=sys.stderr)
            return 1
        raise
    if isinstance(result, conversion.BackboneConversionResult):
        biases = f", attention biases {result.attention_biases}" if result.architecture == "EfficientFormerV2" else ""
        print(
            f"wrote {result.output_dir}: {result.architecture}-{result.variant.upper()} backbone ({result.layout} layout), "
            f"{result.num_parameters:,} parameters{biases}; "
            f"{len(result.dropped_keys)} checkpoint tensors dropped by design"
        )
    else:
        print(
            f"wrote {result.output_dir}: {result.preset}, {result.dataset} ({result.num_labels} classes), "
            f"{result.num_parameters:,} parameters; {len(result.dropped_keys)} checkpoint tensors dropped by design"
        )
    if getattr(result, "verification", None):
        print(
            "verified: max weight difference {max_weight_diff:.3g}, max logits difference {max_logits_diff:.3g}".format(
                **result.verification
            )
        )
    if result.hub_url:
        print(f"uploaded: {result.hub_url}")
    return 0
