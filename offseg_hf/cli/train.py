"""``offseg train``: train or fine-tune OffSeg with the paper's recipe (see :mod:`offseg_hf.training.train`).

Every recipe value has a flag; ``--config FILE`` (JSON or YAML, keys = option names) sets several at
once, and flags given on the command line win over the file. Defaults marked "recipe" depend on the
dataset (ADE20K / COCO-Stuff / Cityscapes / Pascal Context as in the paper; synthetic: a CPU-sized run).
The dataset is checked before training starts (``offseg check-data``); checkpoints are written atomically,
``--resume`` continues from the newest complete one, and Ctrl-C stops after the current step with a checkpoint.
"""

from __future__ import annotations

import argparse

EXAMPLES = """
  offseg train --dataset synthetic --output-dir outputs/quickstart --max-steps 300
  offseg train --dataset ade20k --data-dir data/ADEChallengeData2016 --model offseg-t --output-dir runs/t-ade
  offseg train --config my_run.yaml --resume
  accelerate launch -m offseg_hf train --dataset cityscapes --data-dir data/cityscapes --mixed-precision bf16
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", help="synthetic, ade20k, coco-stuff, cityscapes or pascal-context (default: synthetic)")
    data.add_argument("--data-dir", help="root of the dataset's official local layout (default: none; needed unless "
                      "--hub-id or synthetic)")
    data.add_argument("--hub-id", help="stream this Hub parquet dataset instead, e.g. zhoubolei/scene_parse_150 (default: none)")
    data.add_argument("--image-column", help="Hub image column (default: per known repo, else 'image')")
    data.add_argument("--label-column", help="Hub label column (default: per known repo, else 'label')")
    data.add_argument("--label-format", help="Hub label encoding: train-ids, reduce, coco-stuff-raw or cityscapes-label-ids "
                      "(default: per known repo)")
    data.add_argument("--hub-revision", help="Hub revision (default: main; scene_parse_150: refs/convert/parquet)")
    data.add_argument("--skip-bad-samples", action="store_true", default=None,
                      help="train on the samples that pass the dataset check and report how many were skipped, "
                      "instead of stopping at the first bad one (default: stop)")
    data.add_argument("--num-labels", type=int, help="synthetic: number of classes (default: 8)")
    data.add_argument("--train-samples", type=int, help="synthetic: training scenes (default: 2000)")
    data.add_argument("--eval-samples", type=int, help="synthetic: validation scenes (default: 100)")
    data.add_argument("--image-size", type=int, help="synthetic: scene side in pixels (default: 64)")
    data.add_argument("--eval-max-samples", type=int, help="evaluate on the first N validation images only (default: all)")
    data.add_argument("--crop-size", type=int, help="training crop (default: recipe: 512; Cityscapes 1024; Pascal "
                      "Context 480; synthetic 64)")
    data.add_argument("--train-scale", type=int, nargs=2, metavar=("LONG", "SHORT"),
                      help="random-resize scale (default: recipe: 2048 512; Cityscapes 2048 1024; Pascal Context 520 520; "
                      "synthetic 64 64)")
    data.add_argument("--test-scale", type=int, nargs=2, metavar=("LONG", "SHORT"),
                      help="test resize scale (default: recipe: as --train-scale; synthetic none)")
    data.add_argument("--cat-max-ratio", type=float, help="random-crop category max ratio (default: 0.75)")
    data.add_argument("--no-photometric", dest="photometric", action="store_const", const=False, default=None,
                      help="disable the photometric distortion (default: on)")
    data.add_argument("--num-workers", type=int, help="data loader workers per process (default: 2)")

    model = parser.add_argument_group("model")
    model.add_argument("--model", help="offseg-t | offseg-b | offseg-l, segnext-t | -s | -b | -l (per-pixel) or "
                       "segnext-t-offset … (offset learning), or a folder / Hub id user/name to fine-tune "
                       "(default: offseg-t)")
    model.add_argument("--classifier", choices=["offset-learning", "per-pixel"],
                       help="per-pixel: a 1×1 conv instead of offset learning (ablation, paper Table 6) "
                       "(default: offset-learning)")
    model.add_argument("--backbone-weights", help="EfficientFormerV2Backbone (OffSeg) or MscanBackbone (SegNeXt) folder / "
                       "Hub id with ImageNet weights, e.g. from `offseg convert` (default: none, random init)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--max-steps", type=int, help="optimiser steps (default: recipe: 160000 ADE20K/Cityscapes, 80000 "
                       "COCO-Stuff/Pascal Context, 300 synthetic)")
    optim.add_argument("--global-batch-size", type=int, help="images per optimiser step over all processes (default: "
                       "recipe: 16; Cityscapes 8; synthetic 8)")
    optim.add_argument("--per-device-batch-size", type=int, help="images per process and step (default: global batch / "
                       "(processes × accumulation steps))")
    optim.add_argument("--gradient-accumulation-steps", type=int, help="micro-batches per optimiser step (default: 1)")
    optim.add_argument("--learning-rate", type=float, help="backbone learning rate (default: 6e-5; synthetic 6e-4)")
    optim.add_argument("--head-lr-mult", type=float, help="head learning-rate multiplier (default: 10)")
    optim.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: 0.01)")
    optim.add_argument("--adam-beta1", type=float, help="AdamW beta1 (default: 0.9)")
    optim.add_argument("--adam-beta2", type=float, help="AdamW beta2 (default: 0.999)")
    optim.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default: 1500; synthetic 30)")
    optim.add_argument("--warmup-start-factor", type=float, help="learning-rate factor at step 0 of the warm-up (default: 1e-6)")
    optim.add_argument("--poly-power", type=float, help="power of the poly decay after the warm-up (default: 1.0)")
    optim.add_argument("--no-decay-class-embeddings", action="store_true", default=None,
                       help="exempt the class embeddings from weight decay (default: decayed, as the reference)")
    optim.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], help="(default: no)")

    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", help="checkpoints and the final model (default: outputs/offseg)")
    run.add_argument("--config", dest="config_file", help="JSON / YAML file of options; flags win over it (default: none)")
    run.add_argument("--eval-steps", type=int, help="evaluate every N steps (default: recipe: max steps / 10, at most 16000; "
                     "synthetic 100; with only --save-steps given, the save interval)")
    run.add_argument("--save-steps", type=int, help="checkpoint every N steps, a multiple of --eval-steps (default: the "
                     "eval steps)")
    run.add_argument("--save-total-limit", type=int, help="checkpoints kept (the newest and the best always are) (default: 2)")
    run.add_argument("--eval-batch-size", type=int, help="evaluation images per process (default: recipe: 1; synthetic 8)")
    run.add_argument("--logging-steps", type=int, help="log the loss every N steps (default: 50; synthetic 10)")
    run.add_argument("--seed", type=int, help="seed of the initial weights, data order and augmentations (default: 0)")
    run.add_argument("--resume", action="store_true", default=None,
                     help="continue from the newest complete checkpoint in --output-dir (default: start afresh)")
    run.add_argument("--push-to-hub", metavar="REPO", help="push the final model, processor and card to REPO (default: no)")
    run.add_argument("--hub-private", action="store_true", default=None, help="create the Hub repo private (default: public)")
    run.add_argument("--report-to", help="none, tensorboard, wandb … (default: none)")
    run.add_argument("--time-budget-s", type=float, help="also stop after this many seconds of wall time; results then "
                     "depend on the machine's speed (default: none)")
    run.add_argument("--use-cpu", action="store_true", default=None, help="train on CPU even if a GPU is present (default: GPU when available)")


def resume_hint(args: argparse.Namespace) -> str:
    """The command line that continues this run."""
    import shlex

    argv = list(getattr(args, "_argv", None) or [])
    if argv and argv[0] == "train":
        argv = argv[1:]
    if "--resume" not in argv:
        argv.append("--resume")
    return shlex.join(["offseg", "train", *argv])


def run(args: argparse.Namespace) -> int:
    import logging
    import sys

    from offseg_hf.training.train import TrainingInterrupted, resolve_config, train

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    skip = ("command", "config_file", "debug")
    overrides = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in skip}
    overrides["quiet"] = args.quiet or None
    config = resolve_config(overrides, getattr(args, "config_file", None))
    try:
        metrics = train(config)
    except TrainingInterrupted as stop:
        where = f"checkpoint saved: {stop.checkpoint}" if stop.checkpoint else "no checkpoint could be saved"
        print(f"offseg train: stopped by {stop.signal_name} after step {stop.step}; {where}", file=sys.stderr)
        print(f"continue with:\n  {resume_hint(args)}", file=sys.stderr)
        return 130
    print(f"final mIoU {100 * metrics.get('eval_mIoU', float('nan')):.2f}  "
          f"mAcc {100 * metrics.get('eval_mAcc', float('nan')):.2f}  "
          f"aAcc {100 * metrics.get('eval_aAcc', float('nan')):.2f}  -> {config.output_dir}")
    return 0
