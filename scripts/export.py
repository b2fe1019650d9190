#!/usr/bin/env python
"""``offseg export`` as a script: ``python scripts/export.py …``.

Same options as ``offseg export --help``; the logic lives in ``offseg_hf/cli/export.py`` and the modules it calls.
"""

import sys

from offseg_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
