"""Benchmark (not a test): SegFormer with and without offset learning, same data, budget and seed.

Both models start from the *same* random SegFormer weights (the offset variant is
:func:`~offseg_hf.plug.add_offset_learning` of the plain one, so only the classifier differs), see the same
batches in the same order (per-sample augmentation seeded by ``(seed, epoch, index)``) and train for the same
number of steps with the same AdamW + warm-up/poly schedule. Reported per variant: parameters, training
loss curve, validation mIoU / aAcc (logits bilinearly upsampled to the label size), training wall time and
eval-mode CPU latency (median of interleaved runs, so that load changes on a shared machine hit both alike).

``run_benchmark(BenchmarkSettings(...))`` returns the results dict; :func:`main` is the command line of
``scripts/benchmark_plug.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

__all__ = ["BenchmarkSettings", "main", "measure_latency", "run_benchmark"]

SEGFORMER_B0 = dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], decoder_hidden_size=256)


@dataclass
class BenchmarkSettings:
    """What both variants share. ``segformer`` overrides fields of the SegFormer config (default: B0)."""

    output_dir: str = "outputs/benchmark_plug"
    steps: int = 150
    batch_size: int = 8
    image_size: int = 128
    num_labels: int = 8
    train_samples: int = 2000
    eval_samples: int = 48
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 15
    seed: int = 0
    threads: int = 2
    latency_size: int = 512
    latency_repeats: int = 5
    eval_batch_size: int = 8
    save_models: bool = True
    segformer: dict = field(default_factory=lambda: dict(SEGFORMER_B0))


def _loaders(settings: BenchmarkSettings):
    """Seeded training loader (random resize 0.5–2×, crop, flip, photometric), its per-sample transform (whose
    ``epoch`` seeds the augmentation) and the validation loader."""
    from torch.utils.data import DataLoader

    from offseg_hf.data.pipeline import ExampleTransform, attach_transform, collate_segmentation
    from offseg_hf.data.synthetic import load_synthetic
    from offseg_hf.data.transforms import build_test_transform, build_train_transform

    size = settings.image_size
    common = dict(num_labels=settings.num_labels, image_size=size, seed=settings.seed)
    augment = ExampleTransform(build_train_transform(crop_size=size, scale=(size, size)), seed=settings.seed)
    train = attach_transform(load_synthetic("train", num_samples=settings.train_samples, **common), augment)
    validation = attach_transform(
        load_synthetic("validation", num_samples=settings.eval_samples, **common),
        ExampleTransform(build_test_transform(scale=None)),
    )
    order = torch.Generator().manual_seed(settings.seed)
    train_loader = DataLoader(train, batch_size=settings.batch_size, shuffle=True, generator=order,
                              collate_fn=collate_segmentation, drop_last=True)
    validation_loader = DataLoader(validation, batch_size=settings.eval_batch_size, collate_fn=collate_segmentation)
    return train_loader, augment, validation_loader


def _schedule(step: int, settings: BenchmarkSettings) -> float:
    """Linear warm-up to 1, then polynomial (power 1) decay to 0 at ``settings.steps``."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    return max(0.0, 1.0 - (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps))


def _train(model, train_loader, augment, settings: BenchmarkSettings) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _schedule(step, settings))
    model.train()
    losses, step, epoch = [], 0, 0
    start = time.perf_counter()
    while step < settings.steps:
        augment.epoch = epoch
        for batch in train_loader:
            loss = model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(round(loss.item(), 5))
            step += 1
            if step >= settings.steps:
                break
        epoch += 1
    return {"steps": step, "train_wall_s": time.perf_counter() - start, "loss": losses}


@torch.no_grad()
def _evaluate(model, validation_loader, num_labels: int) -> dict:
    from offseg_hf.metrics import StreamingIoU

    model.eval()
    metric = StreamingIoU(num_labels)
    for batch in validation_loader:
        logits = model(pixel_values=batch["pixel_values"]).logits
        logits = torch.nn.functional.interpolate(logits, size=batch["labels"].shape[-2:], mode="bilinear",
                                                 align_corners=False)
        metric.update(logits.argmax(dim=1), batch["labels"])
    result = metric.compute()
    return {"mIoU": result["mIoU"], "aAcc": result["aAcc"], "per_class_iou": result["per_class_iou"]}


@torch.no_grad()
def measure_latency(models: dict[str, torch.nn.Module], size: int, repeats: int, warmup: int = 2) -> dict[str, dict]:
    """Eval-mode forward latency of each model on `(1, 3, size, size)`, runs interleaved across models.

    Returns per model ``{"median_s", "min_s", "runs_s"}``.
    """
    pixel_values = torch.randn(1, 3, size, size)
    for model in models.values():
        model.eval()
        for _ in range(warmup):
            model(pixel_values=pixel_values)
    runs: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(pixel_values=pixel_values)
            runs[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(r), "min_s": min(r), "runs_s": r} for name, r in runs.items()}


def build_models(settings: BenchmarkSettings):
    """The plain SegFormer (seeded random init) and its offset-learning twin with identical shared weights."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    from offseg_hf.data.synthetic import synthetic_class_names
    from offseg_hf.plug import add_offset_learning

    names = synthetic_class_names(settings.num_labels)
    config = SegformerConfig(
        num_labels=settings.num_labels, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
        **settings.segformer,
    )
    torch.manual_seed(settings.seed)
    plain = SegformerForSemanticSegmentation(config)
    return {"segformer": plain, "segformer+offset": add_offset_learning(plain, verbose=False)}


def run_benchmark(settings: BenchmarkSettings) -> dict:
    """Train and evaluate both variants; writes ``results.json`` / ``results.md`` (and the models) to
    ``settings.output_dir`` and returns the results."""
    from offseg_hf.plug import count_parameters, offset_learning_overhead

    torch.set_num_threads(settings.threads)
    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    models = build_models(settings)
    overhead = offset_learning_overhead(models["segformer"], models["segformer+offset"])
    results: dict = {"settings": asdict(settings), "overhead": str(overhead), "variants": {}}
    for name, model in models.items():
        train_loader, augment, validation_loader = _loaders(settings)  # fresh, identically seeded per variant
        torch.manual_seed(settings.seed + 1)  # dropout / drop-path draws
        trained = _train(model, train_loader, augment, settings)
        evaluated = _evaluate(model, validation_loader, settings.num_labels)
        results["variants"][name] = {"parameters": count_parameters(model), **evaluated, **trained}
        if settings.save_models:
            model.save_pretrained(output_dir / name.replace("+", "-"))
        print(f"{name}: mIoU {evaluated['mIoU']:.4f} after {trained['steps']} steps ({trained['train_wall_s']:.0f} s)")
    latency = measure_latency(models, settings.latency_size, settings.latency_repeats)
    for name in models:
        results["variants"][name]["latency"] = latency[name]
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    (output_dir / "results.md").write_text(format_results(results))
    return results


def format_results(results: dict) -> str:
    """Markdown table of a :func:`run_benchmark` result."""
    settings = results["settings"]
    size = settings["latency_size"]
    lines = [
        f"SegFormer (random init; {settings['segformer']}) on synthetic scenes ({settings['num_labels']} classes, "
        f"{settings['image_size']}²), {settings['steps']} steps × batch {settings['batch_size']}, seed "
        f"{settings['seed']}, {settings['threads']} CPU threads.",
        "",
        f"| variant | params | val mIoU | val aAcc | final loss (mean of last 10) | train wall | latency 1×3×{size}² (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    base = results["variants"].get("segformer")
    for name, row in results["variants"].items():
        tail = row["loss"][-10:]
        latency = row["latency"]["median_s"]
        relative = ""
        if base is not None and name != "segformer":
            relative = f" ({latency / base['latency']['median_s'] - 1:+.1%})"
        lines.append(
            f"| {name} | {row['parameters']:,} | {100 * row['mIoU']:.2f} | {100 * row['aAcc']:.2f} | "
            f"{sum(tail) / max(1, len(tail)):.3f} | {row['train_wall_s']:.0f} s | {1000 * latency:.0f} ms{relative} |"
        )
    lines += ["", results["overhead"], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    defaults = BenchmarkSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in asdict(defaults).items():
        if isinstance(value, (dict, bool)):
            continue
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--no-save-models", action="store_true", help="do not write the trained models")
    args = vars(parser.parse_args(argv))
    save = not args.pop("no_save_models")
    settings = BenchmarkSettings(**args, save_models=save)
    results = run_benchmark(settings)
    print(format_results(results))
    return 0 if all(math.isfinite(v["mIoU"]) for v in results["variants"].values()) else 1
