#!/usr/bin/env python
"""``offseg evaluate`` as a script: ``python scripts/evaluate.py …``.

Same options as ``offseg evaluate --help``; the logic lives in ``offseg_hf/cli/evaluate.py`` and the modules it calls.
"""

import sys

from offseg_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
