"""``offseg evaluate``: mIoU / mAcc / aAcc of a model on a dataset split (JSON + Markdown report).

Examples::

    offseg evaluate --model outputs/synthetic --dataset synthetic
    offseg evaluate --model runs/t-ade --dataset ade20k --data-dir data/ADEChallengeData2016 --mode slide --tta
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder or Hub id (with its preprocessor)")
    parser.add_argument("--dataset", required=True, help="synthetic | ade20k | coco-stuff | cityscapes | pascal-context")
    parser.add_argument("--data-dir", help="root of the official local layout")
    parser.add_argument("--hub-id", help="stream a Hub parquet dataset instead")
    parser.add_argument("--image-column")
    parser.add_argument("--label-column")
    parser.add_argument("--label-format", help="train-ids | reduce | coco-stuff-raw | cityscapes-label-ids")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--mode", choices=["whole", "slide"], default="whole")
    parser.add_argument("--tta", action="store_true", help="multi-scale (0.5-1.75) + flip test")
    parser.add_argument("--max-samples", type=int, help="evaluate the first N images only")
    parser.add_argument("--output-dir", help="where the JSON / Markdown go (default: the model folder, else .)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    synthetic = parser.add_argument_group(
        "synthetic dataset (defaults: the model folder's train_config.json, else 100 scenes of 64 px, seed 0)")
    synthetic.add_argument("--num-labels", type=int, default=None, help="default: the model's")
    synthetic.add_argument("--eval-samples", type=int, default=None)
    synthetic.add_argument("--image-size", type=int, default=None)
    synthetic.add_argument("--seed", type=int, default=None)


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
    from pathlib import Path

    import torch
    from transformers import AutoModelForSemanticSegmentation

    import offseg_hf  # noqa: F401 - registers OffSeg and SegNeXt with the Auto classes
    from offseg_hf.image_processing_offseg import OffSegImageProcessor
    from offseg_hf.data.loading import load_segmentation_dataset
    from offseg_hf.evaluation import evaluate_model, protocol_for, write_report

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForSemanticSegmentation.from_pretrained(args.model, trust_remote_code=False).to(device).eval()
    processor = OffSegImageProcessor.from_pretrained(args.model)
    num_labels = model.config.num_labels
    class_names = [model.config.id2label[i] for i in range(num_labels)]
    dataset = args.dataset.lower()
    if dataset == "synthetic":
        if args.num_labels not in (None, num_labels):
            raise SystemExit(f"--num-labels {args.num_labels} but the model has {num_labels} classes")
        trained = _synthetic_training_settings(args.model)
        for key, fallback in (("eval_samples", 100), ("image_size", 64), ("seed", 0)):
            if getattr(args, key) is None:
                setattr(args, key, trained.get(key, fallback))
        data = load_segmentation_dataset("synthetic", args.split, num_labels=num_labels,
                                         num_samples=args.eval_samples, image_size=args.image_size, seed=args.seed)
    else:
        hub_kwargs = {}
        if args.hub_id:
            hub_kwargs = {"image_column": args.image_column, "label_column": args.label_column,
                          "label_format": args.label_format}
        data = load_segmentation_dataset(dataset, args.split, args.data_dir, args.hub_id, **hub_kwargs)
        from offseg_hf.data.tables import get_dataset_info

        info = get_dataset_info(dataset)
        dataset = info.name
        if info.num_labels != num_labels:
            raise SystemExit(f"{args.model} predicts {num_labels} classes but {dataset} has {info.num_labels}")
    protocol = protocol_for(dataset, args.image_size)
    result = evaluate_model(model, processor, data, num_labels, class_names, mode=args.mode, tta=args.tta,
                            protocol=protocol, max_samples=args.max_samples)
    output_dir = args.output_dir or (args.model if Path(args.model).is_dir() else ".")
    name = f"eval_{dataset}_{args.split}_{args.mode}{'_tta' if args.tta else ''}"
    settings = {"model": args.model, "dataset": dataset, "split": args.split, "mode": args.mode, "tta": args.tta,
                "max_samples": args.max_samples}
    json_path, md_path = write_report(result, output_dir, name, settings)
    print(f"mIoU {100 * result['mIoU']:.2f}  mAcc {100 * result['mAcc']:.2f}  aAcc {100 * result['aAcc']:.2f}  "
          f"({result['num_images']} images) -> {json_path}, {md_path}")
    return 0
