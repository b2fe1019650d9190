#!/usr/bin/env python
"""Convert an official OffSeg checkpoint into a Transformers folder: same as ``offseg convert``.

    python scripts/convert_offseg_to_hf.py offseg-t_ade20k.pth offseg-t-ade20k --verify [--push-to-hub USER/offseg-t-ade20k]
"""

import argparse
import sys

from offseg_hf.commands import convert

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    convert.add_arguments(parser)
    sys.exit(convert.run(parser.parse_args()))
