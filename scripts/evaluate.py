#!/usr/bin/env python
"""Evaluate a model: ``python scripts/evaluate.py --model DIR --dataset NAME [--mode slide] [--tta]``.

Same options as ``offseg evaluate --help``; the logic lives in :mod:`offseg_hf.evaluation`.
"""

import sys

from offseg_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
