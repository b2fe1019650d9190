#!/usr/bin/env python
"""Benchmark (not a test): OffSeg-T from random init on the synthetic dataset, on this machine's CPU.

Runs the same budget and seed twice — offset learning, then a per-pixel 1×1 classifier in its place
(the paper's Table 6 ablation in miniature) — and writes ``results.json`` and ``results.md`` with
steps, wall time, images/s and the mIoU curve of each, plus the majority-class baseline.

    python -m benchmarks.training --output-dir outputs/benchmark --time-budget-s 480

Wall times depend on the machine and on whatever else runs on it; say so when quoting them.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def majority_baseline(num_labels: int, image_size: int, samples: int, seed: int) -> dict:
    """mIoU / aAcc of predicting the most frequent training class everywhere."""
    from offseg_hf.data.synthetic import SyntheticScenes
    from offseg_hf.evaluation.metrics import StreamingIoU

    scenes = SyntheticScenes(num_labels, image_size, seed)
    counts = np.zeros(num_labels, dtype=np.int64)
    for i in range(200):
        counts += np.bincount(scenes.generate(i, "train")[1].ravel(), minlength=num_labels)
    majority = int(counts.argmax())
    metric = StreamingIoU(num_labels)
    for i in range(samples):
        label = scenes.generate(i, "validation")[1]
        metric.update(np.full_like(label, majority), label)
    result = metric.compute()
    return {"mIoU": result["mIoU"], "aAcc": result["aAcc"], "class": majority}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/benchmark")
    parser.add_argument("--time-budget-s", type=float, default=480.0, help="training wall time per variant")
    parser.add_argument("--max-steps", type=int, default=200, help="schedule length (poly decay to 0 at this step)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-steps", type=int, default=25)
    parser.add_argument("--eval-samples", type=int, default=48)
    parser.add_argument("--num-labels", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=6e-4, help="backbone lr (head ×10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=["offset-learning", "per-pixel"])
    args = parser.parse_args(argv)

    import torch

    from offseg_hf.training.train import resolve_config, train

    out = Path(args.output_dir)
    results = {"settings": vars(args), "torch_threads": torch.get_num_threads(),
               "baseline": majority_baseline(args.num_labels, args.image_size, args.eval_samples, args.seed)}
    for variant in args.variants:
        config = resolve_config({
            "dataset": "synthetic", "model": "offseg-t", "classifier": variant, "output_dir": str(out / variant),
            "max_steps": args.max_steps, "global_batch_size": args.batch_size, "image_size": args.image_size,
            "crop_size": args.image_size, "train_scale": (args.image_size, args.image_size),
            "num_labels": args.num_labels, "eval_samples": args.eval_samples, "eval_steps": args.eval_steps,
            "save_steps": args.max_steps, "warmup_steps": max(1, args.max_steps // 10),
            "learning_rate": args.learning_rate, "time_budget_s": args.time_budget_s, "seed": args.seed,
            "num_workers": 0, "logging_steps": 5, "use_cpu": True,
        })
        start = time.monotonic()
        train(config)
        wall = time.monotonic() - start
        history = json.loads((out / variant / "log_history.json").read_text())
        curve = []
        for h in history:  # the final evaluate() repeats the last step's evaluation: keep one
            if "eval_mIoU" in h and (not curve or curve[-1][0] != h["step"]):
                curve.append((h["step"], h["eval_mIoU"]))
        train_end = [h for h in history if "train_runtime" in h][-1]
        steps = train_end["step"]
        results[variant] = {
            "steps": steps, "train_runtime_s": train_end["train_runtime"], "total_wall_s": wall,
            "images_per_s": steps * args.batch_size / train_end["train_runtime"],
            "miou_curve": curve, "final_mIoU": curve[-1][1],
            "final_aAcc": [h["eval_aAcc"] for h in history if "eval_aAcc" in h][-1],
        }
        print(json.dumps({variant: results[variant]}, indent=1), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    lines = ["| variant | steps | train wall (s) | images/s | final mIoU | final aAcc | mIoU curve (step: mIoU) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for variant in args.variants:
        r = results[variant]
        curve = ", ".join(f"{s}: {100 * m:.1f}" for s, m in r["miou_curve"])
        lines.append(f"| {variant} | {r['steps']} | {r['train_runtime_s']:.0f} | {r['images_per_s']:.2f} | "
                     f"{100 * r['final_mIoU']:.1f} | {100 * r['final_aAcc']:.1f} | {curve} |")
    b = results["baseline"]
    lines.append(f"\nMajority-class baseline (class {b['class']}): mIoU {100 * b['mIoU']:.1f}, aAcc {100 * b['aAcc']:.1f}")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
