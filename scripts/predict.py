#!/usr/bin/env python
"""``offseg predict`` as a script: ``python scripts/predict.py …``.

Same options as ``offseg predict --help``; the logic lives in ``offseg_hf/cli/predict.py`` and the modules it calls.
"""

import sys

from offseg_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
