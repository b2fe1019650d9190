#!/usr/bin/env python
"""Thin wrapper: same as `offseg benchmark` (see offseg_hf/benchmark.py)."""

import sys

from offseg_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
