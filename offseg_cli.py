"""Entry point of the ``offseg`` console script.

It executes ``offseg_hf/cli.py`` without importing the ``offseg_hf`` package first: the package's
``__init__`` imports torch and transformers (seconds), which ``offseg --help`` does not need. Commands
import the package when they run. ``python -m offseg_hf.cli`` does the same work, only slower to start.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    spec = importlib.util.find_spec("offseg_hf")  # locates the package without executing its __init__
    if spec is None or not spec.submodule_search_locations:
        print("offseg: the offseg_hf package is not installed", file=sys.stderr)
        return 1
    path = Path(next(iter(spec.submodule_search_locations))) / "cli.py"
    cli_spec = importlib.util.spec_from_file_location("_offseg_cli_dispatcher", path)
    cli = importlib.util.module_from_spec(cli_spec)
    cli_spec.loader.exec_module(cli)
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
