"""``python -m benchmarks.deploy``: CPU deployment formats of OffSeg next to SegFormer, in one process.

Interleaved rounds (every variant once per round, ratios taken within a round, medians reported) of:

* PyTorch eager float32 (BatchNorm folded, as ``offseg predict`` runs), bfloat16 autocast, ``.to(bfloat16)``;
* int8 PT2E static (:func:`offseg_hf.deploy.quantization.quantize_pt2e`, calibrated on synthetic scenes), compiled
  with inductor (and its eager reference, for the drift);
* ONNX Runtime float32 of the file :func:`offseg_hf.export_onnx` writes (dynamic sizes), and int8 of ONNX
  Runtime's static quantiser on it (:func:`offseg_hf.deploy.quantization.quantize_onnx`);
* the baseline (transformers' SegFormer-B0, random weights) eager and in ONNX Runtime, exported the same way.

The ONNX Runtime sessions do not busy-wait between runs (``spin=False``): spinning threads would take the cores
from the PyTorch variant that runs next in the round.

Drift: arg-max agreement of each variant with float32 eager on synthetic scenes at the benchmark size (random
weights), and, with ``--trained DIR`` (a model trained on the synthetic dataset, e.g. ``offseg train --dataset
synthetic --model offseg-t --max-steps 300``), the mIoU of each variant on the synthetic validation set.
"""

EXAMPLES = """
  python -m benchmarks.deploy
  python -m benchmarks.deploy --trained outputs/quickstart --runs 10
  python -m benchmarks.deploy --model offseg-b --no-compile
"""


def add_arguments(parser):
    parser.add_argument("--model", default="offseg-t", help="preset or model folder (default: offseg-t)")
    parser.add_argument("--baseline", default="segformer-b0", help="the comparison model (default: segformer-b0)")
    parser.add_argument("--size", type=int, default=512, help="square input side in pixels (default: 512)")
    parser.add_argument("--runs", type=int, default=5, help="timed interleaved rounds (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds (default: 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads (default: 2)")
    parser.add_argument("--scenes", type=int, default=2, help="synthetic scenes for the arg-max agreement (default: 2)")
    parser.add_argument("--trained", default=None, metavar="DIR",
                        help="a model trained on the synthetic dataset: mIoU of every variant (default: agreement only)")
    parser.add_argument("--eval-samples", type=int, default=100, help="synthetic validation scenes for the mIoU (default: 100)")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip torch.compile of the int8 model (minutes on a small CPU) (default: compile)")
    parser.add_argument("--work-dir", default=None, help="where the ONNX files go (default: a temporary folder)")


def _variants(model, processor, size, threads, work_dir, name, compile):
    """``{variant: network}`` for one model at one ``(H, W)``; each network maps ``pixel_values`` (float32) to
    float32 logits. Also returns the setup seconds of the slow steps (exports, quantisation, compilation)."""
    import time

    import torch

    from offseg_hf.deploy.onnx_export import export_onnx
    from offseg_hf.deploy.onnx_runtime import OnnxSegmenter
    from offseg_hf.deploy.quantization import (
        bfloat16_autocast, calibration_batches, quantize_onnx, quantize_pt2e, to_bfloat16,
    )

    setup, variants = {}, {}

    def eager(pixel_values):
        return model(pixel_values=pixel_values).logits

    def autocast(pixel_values):
        with bfloat16_autocast():
            return model(pixel_values=pixel_values).logits.float()

    bf16 = to_bfloat16(model)

    def cast(pixel_values):
        return bf16(pixel_values=pixel_values.to(torch.bfloat16)).logits.float()

    variants.update({"eager fp32": eager, "bf16 autocast": autocast, "bf16 weights (.to)": cast})
    calibration = calibration_batches(processor, num_batches=4, batch_size=1, size=size)
    start = time.perf_counter()
    quantized = quantize_pt2e(model, calibration)
    setup["int8 PT2E prepare+calibrate+convert"] = time.perf_counter() - start
    variants["int8 PT2E (eager reference)"] = quantized
    if compile:
        compiled = torch.compile(quantized)
        start = time.perf_counter()
        with torch.no_grad():
            compiled(calibration[0])
        setup["int8 PT2E inductor compile"] = time.perf_counter() - start
        variants["int8 PT2E + inductor"] = compiled

    path = f"{work_dir}/{name}.onnx"
    report = export_onnx(model, path, processor=processor, dynamic_size=True, size=size)
    setup["ONNX export (dynamic)"] = report.export_seconds
    setup["ONNX verify (3 sizes)"] = report.verify_seconds
    print(report.summary(), flush=True)
    segmenter = OnnxSegmenter(path, threads=threads, spin=False)
    variants["ONNX Runtime fp32"] = lambda pixel_values: torch.from_numpy(segmenter(pixel_values.numpy()))
    try:
        start = time.perf_counter()
        quantize_onnx(path, f"{work_dir}/{name}-int8.onnx", calibration)
        setup["ONNX Runtime int8 quantisation"] = time.perf_counter() - start
        int8 = OnnxSegmenter(f"{work_dir}/{name}-int8.onnx", threads=threads, spin=False)
        variants["ONNX Runtime int8 (QDQ)"] = lambda pixel_values: torch.from_numpy(int8(pixel_values.numpy()))
    except Exception as error:  # noqa: BLE001 - reported, the rest of the benchmark runs
        print(f"ONNX Runtime int8 quantisation of {name} failed: {type(error).__name__}: {str(error)[:300]}")
    return variants, setup


class _Network:
    """A ``pixel_values → logits`` function as the callable network :func:`offseg_hf.segment_image` takes."""

    def __init__(self, function):
        self.function = function

    def __call__(self, pixel_values):
        return self.function(pixel_values)


def run(args) -> int:
    import os
    import platform
    import statistics
    import tempfile

    import torch

    from benchmarks.models import build_model, interleaved_times, median_ratio, prepare_for_inference
    from offseg_hf.deploy.quantization import calibration_batches
    from offseg_hf.inference.image_processing_offseg import build_image_processor

    if args.threads:
        torch.set_num_threads(args.threads)
    size = (args.size, args.size)
    processor = build_image_processor()
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="offseg-deploy-")
    os.makedirs(work_dir, exist_ok=True)
    torch.manual_seed(0)
    model = prepare_for_inference(build_model(args.model))
    baseline = prepare_for_inference(build_model(args.baseline))
    variants, setup = _variants(model, processor, size, args.threads, work_dir, "model", args.compile)
    base_variants, base_setup = {}, {}
    from offseg_hf.deploy.onnx_export import export_onnx
    from offseg_hf.deploy.onnx_runtime import OnnxSegmenter

    report = export_onnx(baseline, f"{work_dir}/baseline.onnx", processor=processor, dynamic_size=True, size=size)
    print(report.summary(), flush=True)
    base_setup["ONNX export (dynamic)"] = report.export_seconds
    base_segmenter = OnnxSegmenter(report.path, threads=args.threads, spin=False)
    base_variants[f"{args.baseline} eager fp32"] = lambda pixel_values: baseline(pixel_values=pixel_values).logits
    base_variants[f"{args.baseline} ONNX Runtime fp32"] = lambda pv: torch.from_numpy(base_segmenter(pv.numpy()))

    scenes = calibration_batches(processor, num_batches=args.scenes, batch_size=1, size=size, seed=1)
    calls = {**variants, **base_variants}
    with torch.inference_mode():
        times = interleaved_times({name: (lambda f=f: f(scenes[0])) for name, f in calls.items()}, args.runs, args.warmup)
        reference = [model(pixel_values=scene).logits.argmax(1) for scene in scenes]
        agreement = {}
        for name, function in variants.items():
            agreement[name] = statistics.fmean(
                float((function(scene).float().argmax(1) == ref).float().mean()) for scene, ref in zip(scenes, reference)
            )

    miou = {}
    if args.trained:
        from offseg_hf.data.synthetic import load_synthetic
        from offseg_hf.evaluation.evaluate import evaluate_model, protocol_for
        from offseg_hf.inference.predict import load_model

        trained, trained_processor = load_model(args.trained, device="cpu")
        scene_size = 64
        trained_variants, _ = _variants(trained, trained_processor, (scene_size, scene_size), args.threads, work_dir,
                                        "trained", compile=False)
        validation = load_synthetic("validation", num_labels=trained.config.num_labels, num_samples=args.eval_samples,
                                    image_size=scene_size)
        for name, function in trained_variants.items():
            result = evaluate_model(_Network(function), trained_processor, validation, trained.config.num_labels,
                                    protocol=protocol_for("synthetic", scene_size), progress=False)
            miou[name] = 100 * result["mIoU"]
        if "int8 PT2E + inductor" in variants:
            miou["int8 PT2E + inductor"] = miou.get("int8 PT2E (eager reference)")  # same quantised arithmetic

    eager = times["eager fp32"]
    load = f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"
    print(f"\nbatch 1, {args.size}×{args.size}, {args.model} vs {args.baseline} (random weights, 150 classes), "
          f"{args.threads} threads, {args.runs} interleaved rounds after {args.warmup} warm-up; torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, load average at the end {load}")
    header = "| variant | latency (ms, median) | × eager fp32 | × baseline ONNX Runtime | arg-max agreement with fp32 |"
    if miou:
        header += " mIoU synthetic (Δ to fp32) |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    base_ort = times[f"{args.baseline} ONNX Runtime fp32"]
    for name, values in times.items():
        row = (f"| {name} | {1000 * statistics.median(values):.0f} | {median_ratio(values, eager):.2f} | "
               f"{median_ratio(values, base_ort):.2f} | "
               + (f"{100 * agreement[name]:.2f} %" if name in agreement else "–") + " |")
        if miou:
            value = miou.get(name)
            row += (f" {value:.1f} ({value - miou['eager fp32']:+.1f}) |" if value is not None else " – |")
        print(row)
    print("\nsetup (s): " + ", ".join(f"{name} {seconds:.0f}" for name, seconds in {**setup, **{
        f"{args.baseline} {k}": v for k, v in base_setup.items()}}.items()))
    return 0


if __name__ == "__main__":
    import sys

    from offseg_hf.cli import run_tool

    sys.exit(run_tool(sys.modules[__name__]))
