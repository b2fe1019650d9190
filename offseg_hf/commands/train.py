"""``offseg train``: train or fine-tune OffSeg with the paper's recipe (see :mod:`offseg_hf.training`).

Examples::

    offseg train --dataset synthetic --output-dir outputs/synthetic --max-steps 300
    offseg train --dataset ade20k --data-dir data/ADEChallengeData2016 --model offseg-t --output-dir runs/t-ade
    accelerate launch scripts/train.py --dataset cityscapes --data-dir data/cityscapes --mixed-precision bf16 ...
    offseg train --config my_run.yaml --resume

Every recipe value has a flag; ``--config FILE`` (JSON or YAML, keys = option names) sets several at
once, and flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", help="synthetic | ade20k | coco-stuff | cityscapes | pascal-context (default synthetic)")
    data.add_argument("--data-dir", help="root of the official local layout")
    data.add_argument("--hub-id", help="stream a Hub parquet dataset instead (e.g. zhoubolei/scene_parse_150)")
    data.add_argument("--image-column", help="Hub image column (default per known repo, else 'image')")
    data.add_argument("--label-column", help="Hub label column (default per known repo, else 'label')")
    data.add_argument("--label-format", help="train-ids | reduce | coco-stuff-raw | cityscapes-label-ids")
    data.add_argument("--hub-revision", help="Hub revision (scene_parse_150: refs/convert/parquet, set automatically)")
    data.add_argument("--num-labels", type=int, help="synthetic: number of classes (default 8)")
    data.add_argument("--train-samples", type=int, help="synthetic: training scenes (default 2000)")
    data.add_argument("--eval-samples", type=int, help="synthetic: validation scenes (default 100)")
    data.add_argument("--image-size", type=int, help="synthetic: scene size (default 64)")
    data.add_argument("--eval-max-samples", type=int, help="evaluate on the first N validation images only")
    data.add_argument("--crop-size", type=int, help="training crop (512; Cityscapes 1024; Pascal Context 480)")
    data.add_argument("--train-scale", type=int, nargs=2, metavar=("LONG", "SHORT"), help="random-resize scale")
    data.add_argument("--test-scale", type=int, nargs=2, metavar=("LONG", "SHORT"), help="test resize scale")
    data.add_argument("--cat-max-ratio", type=float, help="random-crop category max ratio (0.75)")
    data.add_argument("--no-photometric", dest="photometric", action="store_const", const=False, default=None,
                      help="disable the photometric distortion")
    data.add_argument("--num-workers", type=int, help="data loader workers per process (2)")

    model = parser.add_argument_group("model")
    model.add_argument("--model", help="offseg-t | offseg-b | offseg-l, segnext-t | -s | -b | -l (per-pixel) or "
                       "segnext-t-offset … (offset learning), or a folder / Hub id to fine-tune")
    model.add_argument("--classifier", choices=["offset-learning", "per-pixel"],
                       help="per-pixel: a 1×1 conv instead of offset learning (ablation, paper Table 6)")
    model.add_argument("--backbone-weights", help="EfficientFormerV2Backbone (OffSeg) or MscanBackbone (SegNeXt) folder / "
                       "Hub id with ImageNet weights, e.g. from `offseg convert`")

    optim = parser.add_argument_group("optimisation (defaults: the paper's recipe for the dataset)")
    optim.add_argument("--max-steps", type=int, help="iterations (160k ADE20K/Cityscapes, 80k COCO-Stuff/Context)")
    optim.add_argument("--global-batch-size", type=int, help="images per optimiser step over all processes (16; 8)")
    optim.add_argument("--per-device-batch-size", type=int, help="overrides the split of the global batch")
    optim.add_argument("--gradient-accumulation-steps", type=int)
    optim.add_argument("--learning-rate", type=float, help="backbone learning rate (6e-5; synthetic 6e-4)")
    optim.add_argument("--head-lr-mult", type=float, help="head learning-rate multiplier (10)")
    optim.add_argument("--weight-decay", type=float, help="AdamW weight decay (0.01)")
    optim.add_argument("--adam-beta1", type=float)
    optim.add_argument("--adam-beta2", type=float)
    optim.add_argument("--warmup-steps", type=int, help="linear warm-up iterations (1500)")
    optim.add_argument("--warmup-start-factor", type=float, help="warm-up start factor (1e-6)")
    optim.add_argument("--poly-power", type=float, help="poly decay power (1.0)")
    optim.add_argument("--no-decay-class-embeddings", action="store_true", default=None,
                       help="exempt the class embeddings from weight decay (the reference decays them)")
    optim.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"])

    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", help="checkpoints and the final model (default outputs/offseg)")
    run.add_argument("--config", dest="config_file", help="JSON / YAML file of options (flags win over it)")
    run.add_argument("--eval-steps", type=int, help="evaluate every N steps")
    run.add_argument("--save-steps", type=int, help="checkpoint every N steps (default: eval steps)")
    run.add_argument("--save-total-limit", type=int)
    run.add_argument("--eval-batch-size", type=int, help="per device (1 for datasets of varying image size)")
    run.add_argument("--logging-steps", type=int)
    run.add_argument("--seed", type=int)
    run.add_argument("--resume", action="store_true", default=None, help="continue from the last checkpoint")
    run.add_argument("--push-to-hub", metavar="REPO", help="push the final model, processor and card to REPO")
    run.add_argument("--hub-private", action="store_true", default=None)
    run.add_argument("--report-to", help="none | tensorboard | wandb ...")
    run.add_argument("--time-budget-s", type=float, help="stop training after this many seconds of wall time")
    run.add_argument("--use-cpu", action="store_true", default=None, help="train on CPU even if a GPU is present")


def run(args: argparse.Namespace) -> int:
    import logging

    from offseg_hf.training import resolve_config, train

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    overrides = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("command", "config_file")}
    config = resolve_config(overrides, getattr(args, "config_file", None))
    metrics = train(config)
    print(f"final mIoU {100 * metrics.get('eval_mIoU', float('nan')):.2f}  "
          f"mAcc {100 * metrics.get('eval_mAcc', float('nan')):.2f}  "
          f"aAcc {100 * metrics.get('eval_aAcc', float('nan')):.2f}  -> {config.output_dir}")
    return 0
