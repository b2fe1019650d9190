#!/usr/bin/env python
"""``offseg check-data`` as a script: ``python scripts/check_data.py …``.

Same options as ``offseg check-data --help``; the logic lives in ``offseg_hf/cli/check_data.py`` and the modules it calls.
"""

import sys

from offseg_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["check-data", *sys.argv[1:]]))
