"""``offseg evaluate``: mIoU / mAcc / aAcc of a model on a dataset split (JSON + Markdown report).

The dataset is checked first (fast; see ``offseg check-data``); the report files are written atomically.
"""

from __future__ import annotations

import argparse

EXAMPLES = """
  offseg evaluate --model outputs/quickstart --dataset synthetic
  offseg evaluate --model runs/t-ade --dataset ade20k --data-dir data/ADEChallengeData2016 --mode slide --tta
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder or Hub id user/name (with its preprocessor)")
    parser.add_argument("--dataset", required=True, help="synthetic, ade20k, coco-stuff, cityscapes or pascal-context")
    parser.add_argument("--data-dir", help="root of the dataset's official local layout (default: none)")
    parser.add_argument("--hub-id", help="stream this Hub parquet dataset instead (default: none)")
    parser.add_argument("--image-column", help="Hub image column (default: per known repo, else 'image')")
    parser.add_argument("--label-column", help="Hub label column (default: per known repo, else 'label')")
    parser.add_argument("--label-format", help="Hub label encoding: train-ids, reduce, coco-stuff-raw or "
                        "cityscapes-label-ids (default: per known repo)")
    parser.add_argument("--split", default="validation", help="train, validation (val) or test")
    parser.add_argument("--mode", choices=["whole", "slide"], default="whole",
                        help="whole image in one pass, or the paper's sliding windows")
    parser.add_argument("--tta", action="store_true", help="multi-scale (0.5-1.75) + flip test (default: off)")
    parser.add_argument("--max-samples", type=int, help="evaluate the first N images only (default: all)")
    parser.add_argument("--skip-bad-samples", action="store_true",
                        help="leave out samples that fail the dataset check and report how many (default: stop)")
    parser.add_argument("--output-dir", help="where the JSON / Markdown go (default: the model folder, else .)")
    parser.add_argument("--compile", action="store_true",
                        help="run the network through torch.compile (inductor): faster after the first call of each "
                        "input size, which compiles (default: off)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    synthetic = parser.add_argument_group(
        "synthetic dataset (defaults: the model folder's train_config.json, else 100 scenes of 64 px, seed 0)")
    synthetic.add_argument("--num-labels", type=int, default=None, help="classes (default: the model's)")
    synthetic.add_argument("--eval-samples", type=int, default=None, help="validation scenes (default: as trained, else 100)")
    synthetic.add_argument("--image-size", type=int, default=None, help="scene side (default: as trained, else 64)")
    synthetic.add_argument("--seed", type=int, default=None, help="dataset seed (default: as trained, else 0)")


def _synthetic_training_settings(model: str) -> dict:
    """``eval_samples`` / ``image_size`` / ``seed`` from ``<model>/train_config.json``, if it exists."""
    import json
    from pathlib import Path

    path = Path(model) / "train_config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    if config.get("dataset") != "synthetic":
        return {}
    return {key: config[key] for key in ("eval_samples", "image_size", "seed") if config.get(key) is not None}


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from offseg_hf.data.check import ensure_clean
    from offseg_hf.data.files import IGNORE_INDEX
    from offseg_hf.data.loading import load_segmentation_dataset
    from offseg_hf.evaluation.evaluate import evaluate_model, protocol_for, write_report
    from offseg_hf.inference.predict import ModelLoadError, load_model

    dataset = args.dataset.lower()
    ignore_index = IGNORE_INDEX
    if dataset != "synthetic":  # the dataset first: a missing folder is reported before the model loads
        from offseg_hf.data.registry import get_dataset_info

        info = get_dataset_info(dataset)
        dataset, ignore_index = info.name, info.ignore_index
        hub_kwargs = {}
        if args.hub_id:
            hub_kwargs = {"image_column": args.image_column, "label_column": args.label_column,
                          "label_format": args.label_format}
        data = load_segmentation_dataset(dataset, args.split, args.data_dir, args.hub_id, **hub_kwargs)
        if args.max_samples is not None and hasattr(data, "select"):
            data = data.select(range(min(args.max_samples, len(data))))
        data = ensure_clean(data, f"{dataset} {args.split}", skip_bad_samples=args.skip_bad_samples)
    try:
        model, processor = load_model(args.model, device=args.device or "auto", compile=args.compile)
    except ModelLoadError as error:
        print(f"offseg evaluate: {error}", file=sys.stderr)
        return 2
    num_labels = model.config.num_labels
    class_names = [model.config.id2label[i] for i in range(num_labels)]
    if dataset == "synthetic":
        if args.num_labels not in (None, num_labels):
            raise SystemExit(f"--num-labels {args.num_labels} but the model has {num_labels} classes")
        trained = _synthetic_training_settings(args.model)
        for key, fallback in (("eval_samples", 100), ("image_size", 64), ("seed", 0)):
            if getattr(args, key) is None:
                setattr(args, key, trained.get(key, fallback))
        data = load_segmentation_dataset("synthetic", args.split, num_labels=num_labels,
                                         num_samples=args.eval_samples, image_size=args.image_size, seed=args.seed)
    elif info.num_labels != num_labels:
        raise SystemExit(f"{args.model} predicts {num_labels} classes but {dataset} has {info.num_labels}")
    protocol = protocol_for(dataset, args.image_size)
    result = evaluate_model(model, processor, data, num_labels, class_names, mode=args.mode, tta=args.tta,
                            protocol=protocol, max_samples=args.max_samples, progress=not args.quiet,
                            ignore_index=ignore_index)
    output_dir = args.output_dir or (args.model if Path(args.model).is_dir() else ".")
    name = f"eval_{dataset}_{args.split}_{args.mode}{'_tta' if args.tta else ''}"
    settings = {"model": args.model, "dataset": dataset, "split": args.split, "mode": args.mode, "tta": args.tta,
                "max_samples": args.max_samples}
    json_path, md_path = write_report(result, output_dir, name, settings)
    print(f"mIoU {100 * result['mIoU']:.2f}  mAcc {100 * result['mAcc']:.2f}  aAcc {100 * result['aAcc']:.2f}  "
          f"({result['num_images']} images) -> {json_path}, {md_path}")
    return 0
