"""``python -m research.mine_prototypes``: ideal class representations W* = M·(Eᵀ)⁺ (Eq. 2) over a dataset split, and Fig. 3.

Writes ``ideal_prototypes_heatmap.png``, ``ideal_prototypes.json`` and ``ideal_prototypes.npz`` to
``--output-dir`` and prints the reconstruction mIoU of ``argmax(W*·Eᵀ)`` and, per shown class, the mean
pairwise cosine similarity of its per-image W*. The analysis itself lives in :mod:`research.prototypes`.
"""

from __future__ import annotations

import argparse

EXAMPLES = """
  python -m research.mine_prototypes --model offseg-t --dataset synthetic --max-images 50
  python -m research.mine_prototypes --model offseg-t-ade20k --dataset ade20k --data-dir data/ADEChallengeData2016 --classes wall sky
"""

# Random-init models for smoke runs (no download); any folder / Hub id of a supported model works too.
RANDOM_MODELS = ("offseg-t", "offseg-b", "offseg-l", "segformer-b0", "segformer-b0-offset")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="folder or Hub id of an OffSeg, SegFormer or SegFormer + offset learning model, or "
                             f"one of {', '.join(RANDOM_MODELS)} (random weights, for smoke runs)")
    parser.add_argument("--dataset", default="synthetic", help="synthetic, ade20k, coco-stuff, cityscapes or pascal-context")
    parser.add_argument("--split", default="validation", help="train or validation")
    parser.add_argument("--data-dir", help="root of the dataset's official local layout (default: none)")
    parser.add_argument("--hub-id", help="stream this Hub dataset instead of --data-dir (default: none)")
    parser.add_argument("--test-scale", type=int, nargs=2, metavar=("LONG", "SHORT"),
                        help="keep-ratio resize of the images before the model (default: none for synthetic, "
                             "2048 512 otherwise)")
    parser.add_argument("--max-images", type=int, default=200, help="images processed")
    parser.add_argument("--images-per-class", type=int, default=10, help="N: images per class in the heat maps")
    parser.add_argument("--classes", nargs="+", help="class names or ids shown (default: the most frequent)")
    parser.add_argument("--num-shown", type=int, default=6, help="classes shown when --classes is not given")
    parser.add_argument("--no-learned", action="store_true", help="leave the model's learned W out of the maps (default: shown)")
    parser.add_argument("--output-dir", default="outputs/prototypes", help="where the heat map, JSON and NPZ go")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 …")
    parser.add_argument("--num-labels", type=int, default=8, help="synthetic: classes")
    parser.add_argument("--num-samples", type=int, default=200, help="synthetic: split size")
    parser.add_argument("--image-size", type=int, default=128, help="synthetic: scene size")
    parser.add_argument("--seed", type=int, default=0, help="synthetic: dataset seed")


def load_model(name: str, num_labels: int, class_names: list[str] | None = None):
    """A model by folder / Hub id (any registered class), or a random-init one by name (:data:`RANDOM_MODELS`)."""
    import torch
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    labels = {}
    if class_names is not None:
        labels = {"id2label": dict(enumerate(class_names)), "label2id": {n: i for i, n in enumerate(class_names)}}
    key = name.lower()
    if key.startswith("offseg-") and key in RANDOM_MODELS:
        from offseg_hf import OffSegConfig, OffSegForSemanticSegmentation

        torch.manual_seed(0)
        return OffSegForSemanticSegmentation(OffSegConfig.from_preset(key, num_labels=num_labels, **labels))
    if key.startswith("segformer-b0") and key in RANDOM_MODELS:
        from offseg_hf.plug import add_offset_learning

        torch.manual_seed(0)
        model = SegformerForSemanticSegmentation(SegformerConfig(num_labels=num_labels, **labels))
        return add_offset_learning(model) if key.endswith("offset") else model
    from pathlib import Path

    from offseg_hf.inference.predict import HUB_ID
    from offseg_hf.inference.predict import load_model as load_model_folder

    if not Path(name).expanduser().is_dir() and not HUB_ID.match(name):  # no Hub request for a mistyped name
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(RANDOM_MODELS)}, a model folder or a "
                         "Hub id user/name")
    return load_model_folder(name, device="cpu", fold_batch_norm=False)[0]  # the loader of predict and evaluate (Auto classes)


def run(args: argparse.Namespace) -> int:
    import torch
    from torch.utils.data import DataLoader

    from research.prototypes import mine_ideal_prototypes
    from offseg_hf.data.loading import load_segmentation_dataset
    from offseg_hf.data.pipeline import ExampleTransform, attach_transform, collate_segmentation
    from offseg_hf.data.transforms import build_test_transform

    synthetic = args.dataset.lower() == "synthetic"
    extra = {}
    if synthetic:
        extra = {"num_labels": args.num_labels, "num_samples": args.num_samples, "image_size": args.image_size,
                 "seed": args.seed}
    dataset = load_segmentation_dataset(args.dataset, args.split, args.data_dir, args.hub_id, **extra)
    scale = tuple(args.test_scale) if args.test_scale else (None if synthetic else (2048, 512))
    dataset = attach_transform(dataset, ExampleTransform(build_test_transform(scale=scale)))
    batches = DataLoader(dataset, batch_size=1, collate_fn=collate_segmentation)

    class_names = None
    if synthetic:
        from offseg_hf.data.synthetic import synthetic_class_names

        class_names = synthetic_class_names(args.num_labels)
    model = load_model(args.model, args.num_labels, class_names).to(args.device).eval()
    with torch.no_grad():
        result = mine_ideal_prototypes(model, batches, args.images_per_class, args.max_images)
    paths = result.save(args.output_dir, args.classes, args.num_shown, include_learned=not args.no_learned,
                        title=f"{args.model}: cosine similarity of per-image W* (Eq. 2), {args.dataset} {args.split}")
    summary = result.summary(result.select_classes(args.classes, args.num_shown))
    print(f"{result.num_images} images: reconstruction mIoU of argmax(W*·Eᵀ) = {100 * result.reconstruction['mIoU']:.2f}%")
    if result.underdetermined_images:
        print(f"warning: {result.underdetermined_images} images have no more feature pixels than feature channels: "
              "W* fits them exactly whatever the features; use larger inputs (--image-size / --test-scale)")
    for name, entry in summary["classes"].items():
        print(f"  {name}: mean pairwise cosine of W* over {len(entry['image_ids'])} images = "
              f"{entry['mean_pairwise_cosine']:.3f}")
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    import sys

    from offseg_hf.cli import run_tool

    sys.exit(run_tool(sys.modules[__name__]))
