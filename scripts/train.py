#!/usr/bin/env python
"""``offseg train`` as a script: ``python scripts/train.py …`` or ``accelerate launch scripts/train.py …`` (multi-process / multi-GPU).

Same options as ``offseg train --help``; the logic lives in ``offseg_hf/cli/train.py`` and the modules it calls.
"""

import sys

from offseg_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
