"""``python -m benchmarks.compare_models``: parameters, MACs, operators, latency, training speed and memory next to
SegFormer, in one run."""

EXAMPLES = """
  python -m benchmarks.compare_models
  python -m benchmarks.compare_models --models segformer-b0 offseg-t --train-runs 5 --compile --memory
  python -m benchmarks.compare_models --device cuda --models segformer-b0 offseg-t offseg-b offseg-l
"""

DEFAULT_MODELS = ["segformer-b0", "segformer-b1", "segformer-b2", "offseg-t", "offseg-b", "offseg-l"]


def add_arguments(parser):
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="models to compare (default: %(default)s)")
    parser.add_argument("--size", type=int, default=512, help="square input side in pixels (default: 512)")
    parser.add_argument("--runs", type=int, default=10, help="timed rounds (all models once each); medians are reported (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing (default: 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads, 0 leaves torch's choice (default: 2)")
    parser.add_argument("--baseline", default="segformer-b0", help="ratios are relative to this model (default: segformer-b0)")
    parser.add_argument("--train-runs", type=int, default=0, help="timed AdamW steps per model at batch 2 (default: 0, off)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (inductor) inference")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory of a training step and of inference")
    parser.add_argument(
        "--products", action="store_true",
        help="also profile the time per forward in convolutions and matrix products (eager, and compiled with "
        "--compile): the part of the latency no other change can remove at this machine's library speed",
    )
    parser.add_argument(
        "--device", default="cpu",
        help="cpu (the full table) or cuda: latency with CUDA events for fp32/bf16/fp16 autocast, batch 1 and 8, "
        "eager / compiled / CUDA graphs (default: cpu)",
    )


def run(args) -> int:
    import torch

    from benchmarks.models import cpu_facts, format_device_table, format_table, run_benchmark, run_device_benchmark

    if args.device != "cpu":
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            print(f"offseg benchmark: --device {args.device} needs a CUDA GPU, and PyTorch sees none on this machine "
                  "(torch.cuda.is_available() is False); run it on a GPU machine or use --device cpu")
            return 2
        rows = run_device_benchmark(args.models, device=args.device, size=args.size, runs=args.runs,
                                    warmup=args.warmup, baseline=args.baseline)
        print(f"{args.size}×{args.size}, eval (BatchNorm folded), CUDA-event medians of {args.runs} rounds; "
              f"{torch.cuda.get_device_name(args.device)}, torch {torch.__version__}")
        print(format_device_table(rows, baseline=args.baseline))
        return 0
    rows = run_benchmark(
        args.models, size=args.size, runs=args.runs, warmup=args.warmup, threads=args.threads,
        baseline=args.baseline, train_runs=args.train_runs, compile=args.compile, memory=args.memory,
        products=args.products,
    )
    print(
        f"batch 1, {args.size}×{args.size}, float32, eval (BatchNorm folded), {torch.get_num_threads()} threads, "
        f"{args.runs} interleaved rounds after {args.warmup} warm-ups (ratios: median of per-round ratios); "
        f"training: AdamW step at batch 2; torch {torch.__version__}"
    )
    print(f"CPU at the end: {cpu_facts().line()}")
    print(format_table(rows, baseline=args.baseline))
    return 0


if __name__ == "__main__":
    import sys

    from offseg_hf.cli import run_tool

    sys.exit(run_tool(sys.modules[__name__]))
