#!/usr/bin/env python
"""Ideal class representations W* = M·(Eᵀ)⁺ (paper Eq. 2) and the Fig. 3 similarity heat maps.

    python scripts/mine_ideal_prototypes.py --model outputs/benchmark_plug/segformer --dataset synthetic \
        --num-labels 8 --image-size 64 --output-dir outputs/prototypes/segformer

For OffSeg, SegFormer and SegFormer + offset learning models (a folder, a Hub id, or a random-init name for
smoke runs). Options: ``--help``; the logic lives in :mod:`offseg_hf.commands.prototypes` and
:mod:`offseg_hf.analysis`.
"""

import argparse
import sys

from offseg_hf.commands import prototypes

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    prototypes.add_arguments(parser)
    sys.exit(prototypes.run(parser.parse_args()))
