"""``python -m offseg_hf …`` is ``offseg …`` (so ``accelerate launch -m offseg_hf train …`` and
``torchrun … -m offseg_hf train …`` work)."""

import sys

from offseg_hf.cli import main

if __name__ == "__main__":
    sys.exit(main())
