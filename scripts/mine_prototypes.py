#!/usr/bin/env python
"""``python -m research.mine_prototypes`` as a script (ideal class representations (paper Eq. 2)): ``python scripts/mine_prototypes.py …`` from a source checkout.

The tool lives in ``research/mine_prototypes.py``, outside the installed package; this puts the checkout on the path.
"""

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from offseg_hf.cli import run_tool  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_tool(importlib.import_module("research.mine_prototypes"), prog="python scripts/mine_prototypes.py"))
