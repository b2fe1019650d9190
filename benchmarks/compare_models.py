"""``python -m benchmarks.compare_models``: parameters, MACs and CPU latency of OffSeg next to SegFormer, in one run."""

EXAMPLES = """
  python -m benchmarks.compare_models
  python -m benchmarks.compare_models --models offseg-t segformer-b0 --size 512 --runs 5 --threads 4
"""

DEFAULT_MODELS = ["segformer-b0", "segformer-b1", "segformer-b2", "offseg-t", "offseg-b", "offseg-l"]


def add_arguments(parser):
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="models to compare (default: %(default)s)")
    parser.add_argument("--size", type=int, default=512, help="square input side in pixels (default: 512)")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per model; the median is reported (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing (default: 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads, 0 leaves torch's choice (default: 2)")
    parser.add_argument("--baseline", default="segformer-b0", help="latency ratios are relative to this model (default: segformer-b0)")


def run(args) -> int:
    import platform

    import torch

    from benchmarks.models import format_table, run_benchmark

    rows = run_benchmark(args.models, size=args.size, runs=args.runs, warmup=args.warmup, threads=args.threads)
    print(
        f"batch 1, {args.size}×{args.size}, float32, eval, {torch.get_num_threads()} threads, "
        f"median of {args.runs} runs after {args.warmup} warm-ups; torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}"
    )
    print(format_table(rows, baseline=args.baseline))
    return 0


if __name__ == "__main__":
    import sys

    from offseg_hf.cli import run_tool

    sys.exit(run_tool(sys.modules[__name__]))
