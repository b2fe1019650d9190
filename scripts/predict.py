#!/usr/bin/env python
"""Same as ``offseg predict ...`` (see ``offseg predict --help``), for checkouts without the console script."""

import sys

from offseg_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
