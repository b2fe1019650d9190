#!/usr/bin/env python
"""Train OffSeg: ``python scripts/train.py ...`` or ``accelerate launch scripts/train.py ...``.

Same options as ``offseg train --help``; the logic lives in :mod:`offseg_hf.training`.
"""

import sys

from offseg_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
