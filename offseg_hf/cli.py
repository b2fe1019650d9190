"""The ``offseg`` command line.

Each sub-command lives in ``offseg_hf/commands/<name>.py`` and exposes two functions,
``add_arguments(parser)`` and ``run(args) -> int`` (the exit status). Every module is imported to
build the parser, so a command module keeps its heavy imports (torch, transformers, datasets)
inside ``run`` and ``offseg --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> one-line help; the module offseg_hf.commands.<name> implements it.
COMMANDS = {
    "predict": "segment images and write label maps, overlays and class statistics",
    "train": "train or fine-tune an OffSeg model with the paper's recipe",
    "evaluate": "compute mIoU / mAcc / aAcc of a model on a dataset split",
    "convert": "convert an official OffSeg, SegFormer or SegNeXt (w/ offset learning) checkpoint into a Transformers folder",
    "benchmark": "parameters, MACs and CPU latency next to SegFormer",
    "prototypes": "ideal class representations (Eq. 2) and Fig. 3 heat maps",
}


def build_parser(commands: dict[str, str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offseg", description="OffSeg semantic segmentation tools.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in (commands or COMMANDS).items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_command=name)
        try:
            module = importlib.import_module(f"offseg_hf.commands.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"offseg_hf.commands.{name}":
                raise
            sub.set_defaults(_unavailable=True)
            continue
        module.add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_command", None) is None:
        parser.print_help()
        return 2
    if getattr(args, "_unavailable", False):
        print(f"offseg {args._command}: this sub-command is not available in this installation", file=sys.stderr)
        return 2
    module = importlib.import_module(f"offseg_hf.commands.{args._command}")
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
