#!/usr/bin/env python
"""``offseg convert`` as a script: ``python scripts/convert.py …``.

Same options as ``offseg convert --help``; the logic lives in ``offseg_hf/cli/convert.py`` and the modules it calls.
"""

import sys

from offseg_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
