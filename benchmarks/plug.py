"""Benchmark (not a test): SegFormer with and without offset learning, same data, budget and seed.

All variants start from the *same* random SegFormer weights (the offset variants are
:func:`~offseg_hf.plug.add_offset_learning` of the plain one, so only the classifier differs) and are trained
in lockstep: every step, the same batch (per-sample augmentation seeded by ``(seed, epoch, index)``) goes
through each model in turn, with the same AdamW + warm-up/poly schedule and the same drop-path draws. Load
changes on a shared machine therefore hit all variants alike, and the per-variant compute time (forward,
backward, optimizer step) is comparable.

Variants: ``segformer`` (1×1 classifier at 1/4), ``segformer-offset`` (the paper's: 2×2 max-pool + offset
learning, logits at 1/8), ``segformer-offset-pool1`` (offset learning at 1/4, to separate the effect of
offset learning from that of the coarser output). Reported per variant: parameters, training loss curve,
validation mIoU / aAcc (logits bilinearly upsampled to the label size), training compute time and eval-mode
CPU latency (min and median of interleaved runs).

``run_benchmark(BenchmarkSettings(...))`` returns the results dict; :func:`main` is the command line
``python -m benchmarks.plug``.
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

__all__ = ["BenchmarkSettings", "count_flops", "format_results", "main", "measure_latency", "run_benchmark"]

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
    latency_repeats: int = 10
    eval_batch_size: int = 8
    save_models: bool = True
    variants: tuple[str, ...] = ("segformer", "segformer-offset", "segformer-offset-pool1")
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


def _batches(train_loader, augment, steps: int):
    """``steps`` training batches, epoch after epoch (the augmentation seed follows the epoch)."""
    step, epoch = 0, 0
    while step < steps:
        augment.epoch = epoch
        for batch in train_loader:
            yield batch
            step += 1
            if step >= steps:
                return
        epoch += 1


def _train_lockstep(models: dict[str, torch.nn.Module], settings: BenchmarkSettings) -> dict[str, dict]:
    """Train every model on the same batches, one step of each in turn; per model: loss curve, compute time."""
    train_loader, augment, _ = _loaders(settings)
    optimizers = {
        name: torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
        for name, model in models.items()
    }
    schedulers = {
        name: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _schedule(step, settings))
        for name, optimizer in optimizers.items()
    }
    records = {name: {"steps": 0, "train_compute_s": 0.0, "loss": []} for name in models}
    for model in models.values():
        model.train()
    for step, batch in enumerate(_batches(train_loader, augment, settings.steps)):
        for name, model in models.items():
            torch.manual_seed(settings.seed * 100_003 + step)  # same drop-path draws in every variant
            start = time.perf_counter()
            loss = model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            optimizers[name].step()
            schedulers[name].step()
            record = records[name]
            if step > 0:  # the first step (allocations, lazy init) is left out of the timing
                record["train_compute_s"] += time.perf_counter() - start
            record["loss"].append(round(loss.item(), 5))
            record["steps"] += 1
    return records


@torch.no_grad()
def _evaluate(model, validation_loader, num_labels: int) -> dict:
    from offseg_hf.evaluation.metrics import StreamingIoU

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


@torch.no_grad()
def count_flops(model: torch.nn.Module, size: int) -> int:
    """FLOPs of one eval forward on `(1, 3, size, size)` by ``torch.utils.flop_counter`` (2 per multiply-add of
    matmuls and convolutions; element-wise ops, softmax and norms not counted). Independent of machine load."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(pixel_values=torch.zeros(1, 3, size, size))
    return counter.get_total_flops()


def build_models(settings: BenchmarkSettings) -> dict[str, torch.nn.Module]:
    """The requested variants; all share the plain SegFormer's seeded random weights except the classifier."""
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
    builders = {
        "segformer": lambda: plain,
        "segformer-offset": lambda: add_offset_learning(plain),
        "segformer-offset-pool1": lambda: add_offset_learning(plain, pool_size=1),
    }
    unknown = [name for name in settings.variants if name not in builders]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(builders)}")
    models = {}
    for name in settings.variants:
        torch.manual_seed(settings.seed + 1)  # the offset-learning weights of both offset variants are equal
        models[name] = builders[name]()
    return models


def run_benchmark(settings: BenchmarkSettings) -> dict:
    """Train and evaluate the variants; writes ``results.json`` / ``results.md`` (and the models) to
    ``settings.output_dir`` and returns the results."""
    from offseg_hf.plug import count_parameters, offset_learning_overhead

    torch.set_num_threads(settings.threads)
    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    models = build_models(settings)
    results: dict = {"settings": asdict(settings), "variants": {}}
    if "segformer" in models and "segformer-offset" in models:
        results["overhead"] = str(offset_learning_overhead(models["segformer"], models["segformer-offset"]))
    start = time.perf_counter()
    records = _train_lockstep(models, settings)
    results["train_wall_s"] = time.perf_counter() - start
    _, _, validation_loader = _loaders(settings)
    for name, model in models.items():
        evaluated = _evaluate(model, validation_loader, settings.num_labels)
        results["variants"][name] = {
            "parameters": count_parameters(model),
            "gflops": count_flops(model, settings.latency_size) / 1e9,
            **evaluated,
            **records[name],
        }
        if settings.save_models:
            model.save_pretrained(output_dir / name)
        print(f"{name}: mIoU {evaluated['mIoU']:.4f} after {records[name]['steps']} steps")
    _write(results, output_dir)  # kept if the latency phase is cut short
    if settings.latency_repeats > 0:
        latency = measure_latency(models, settings.latency_size, settings.latency_repeats)
        for name in models:
            results["variants"][name]["latency"] = latency[name]
        _write(results, output_dir)
    return results


def _write(results: dict, output_dir: Path) -> None:
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    (output_dir / "results.md").write_text(format_results(results))


def format_results(results: dict) -> str:
    """Markdown table of a :func:`run_benchmark` result."""
    settings = results["settings"]
    size = settings["latency_size"]
    lines = [
        f"SegFormer (random init; {settings['segformer']}) on synthetic scenes ({settings['num_labels']} classes, "
        f"{settings['image_size']}²), {settings['steps']} steps × batch {settings['batch_size']} in lockstep, "
        f"seed {settings['seed']}, {settings['threads']} CPU threads; total training wall "
        f"{results['train_wall_s']:.0f} s.",
        "",
        f"| variant | params | val mIoU | val aAcc | loss (mean of last 10 steps) | train compute | "
        f"GFLOPs 1×3×{size}² | latency 1×3×{size}² min / median |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = results["variants"].get("segformer")
    for name, row in results["variants"].items():
        tail = row["loss"][-10:]
        latency = row.get("latency")
        timing = "not measured"
        if latency is not None:
            timing = f"{1000 * latency['min_s']:.0f} / {1000 * latency['median_s']:.0f} ms"
            if base is not None and name != "segformer" and "latency" in base:
                timing += f" ({latency['min_s'] / base['latency']['min_s'] - 1:+.1%} min)"
        lines.append(
            f"| {name} | {row['parameters']:,} | {100 * row['mIoU']:.2f} | {100 * row['aAcc']:.2f} | "
            f"{sum(tail) / max(1, len(tail)):.3f} | {row['train_compute_s']:.0f} s | {row['gflops']:.2f} | {timing} |"
        )
    if "overhead" in results:
        lines += ["", results["overhead"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    defaults = BenchmarkSettings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in asdict(defaults).items():
        if isinstance(value, (dict, bool, tuple)):
            continue
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--variants", nargs="+", default=list(defaults.variants))
    parser.add_argument("--no-save-models", action="store_true", help="do not write the trained models")
    args = vars(parser.parse_args(argv))
    save = not args.pop("no_save_models")
    args["variants"] = tuple(args["variants"])
    settings = BenchmarkSettings(**args, save_models=save)
    results = run_benchmark(settings)
    print(format_results(results))
    return 0 if all(math.isfinite(v["mIoU"]) for v in results["variants"].values()) else 1


if __name__ == "__main__":
    import sys

    sys.exit(main())
