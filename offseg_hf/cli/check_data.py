"""``offseg check-data``: check a dataset's samples before training and report every bad file.

Checks file pairing (an annotation for every image), that images and label maps can be read, that each label
map has its image's size, and that label values fit the dataset's encoding (e.g. 0..150 for ADE20K, 0 =
ignore); see :mod:`offseg_hf.data.check`. ``offseg train`` and ``offseg evaluate`` run the fast part of this
check automatically. Exit status: 0 when every sample passes, 1 when some fail (each named with its problem).
"""

from __future__ import annotations

import argparse

EXAMPLES = """
  offseg check-data --dataset ade20k --data-dir data/ADEChallengeData2016
  offseg check-data --dataset cityscapes --data-dir data/cityscapes --split validation --fast
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="synthetic, ade20k, coco-stuff, cityscapes or pascal-context")
    parser.add_argument("--data-dir", help="root of the dataset's official local layout (default: none)")
    parser.add_argument("--hub-id", help="check this Hub parquet dataset instead (default: none)")
    parser.add_argument("--image-column", help="Hub image column (default: per known repo, else 'image')")
    parser.add_argument("--label-column", help="Hub label column (default: per known repo, else 'label')")
    parser.add_argument("--label-format", help="Hub label encoding (default: per known repo)")
    parser.add_argument("--split", nargs="+", default=["train", "validation"], help="splits to check")
    parser.add_argument("--fast", action="store_true",
                        help="headers only (pairing, readability, sizes), as train/evaluate do; no label values "
                        "(default: read every sample completely)")
    parser.add_argument("--max-problems", type=int, default=50, help="problems listed per split")


def run(args: argparse.Namespace) -> int:
    from offseg_hf.data.check import check_dataset
    from offseg_hf.data.loading import load_segmentation_dataset

    hub_kwargs = {}
    if args.hub_id:
        hub_kwargs = {"image_column": args.image_column, "label_column": args.label_column,
                      "label_format": args.label_format}
    status = 0
    for split in args.split:
        data = load_segmentation_dataset(args.dataset, split, args.data_dir, args.hub_id, **hub_kwargs)
        report = check_dataset(data, f"{args.dataset} {split}", full=not args.fast, progress=not args.quiet)
        print(report.format(limit=args.max_problems))
        status = status or (0 if report.ok else 1)
    return status
