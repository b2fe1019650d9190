#!/usr/bin/env python
"""``python -m benchmarks.compare_models`` as a script (speed, size and memory next to SegFormer): ``python scripts/benchmark.py …`` from a source checkout.

The tool lives in ``benchmarks/compare_models.py``, outside the installed package; this puts the checkout on the path.
"""

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from offseg_hf.cli import run_tool  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_tool(importlib.import_module("benchmarks.compare_models"), prog="python scripts/benchmark.py"))
