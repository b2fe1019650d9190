#!/usr/bin/env python
"""Benchmark (not a test): SegFormer-B0 (random init) with and without offset learning on the synthetic dataset.

Same initial weights, data order, augmentation, step budget and seed for both; reports parameters, validation
mIoU, training wall time and CPU latency (``results.json`` / ``results.md`` in ``--output-dir``).

    python scripts/benchmark_plug.py --output-dir outputs/benchmark_plug --steps 150 --image-size 64

Wall times and latencies depend on the machine and on whatever else runs on it; say so when quoting them.
The logic lives in :mod:`offseg_hf.plug_benchmark`.
"""

import sys

from offseg_hf.plug_benchmark import main

if __name__ == "__main__":
    sys.exit(main())
