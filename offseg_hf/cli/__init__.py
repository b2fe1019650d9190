"""The ``offseg`` command line (also ``python -m offseg_hf``): a dispatcher over ``offseg_hf/cli/<name>.py``.

A sub-command is one entry of :data:`COMMANDS` and one module ``offseg_hf/cli/<name>.py`` with

* ``add_arguments(parser)``: its options (every option with a help text that states its real default);
* ``run(args) -> int``: the work, returning the exit status;
* ``EXAMPLES``: example command lines, shown at the end of ``offseg <name> --help``.

Speed: ``offseg --help`` and ``offseg <name> --help`` must answer at once, so the ``offseg_hf`` package (whose
names load lazily), this module and the command modules import nothing heavy at top level (torch, transformers,
datasets are imported inside ``run``).

The benchmark and research tools of a source checkout (``benchmarks/``, ``research/``) are command modules of
the same shape run by :func:`run_tool` (``python -m benchmarks.compare_models``); the installed package never
imports them.

Errors: a failing command prints one line, ``offseg <name>: error: <message>``, and exits with status 1 (2 for
invalid arguments, 130 on Ctrl-C); ``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from types import ModuleType

from offseg_hf import __version__

# name -> one-line help; the module offseg_hf/cli/<name>.py implements it. One line per sub-command.
COMMANDS = {
    "predict": "segment images and write label maps, overlays and class statistics",
    "train": "train or fine-tune an OffSeg model with the paper's recipe",
    "evaluate": "compute mIoU / mAcc / aAcc of a model on a dataset split",
    "check-data": "check a dataset (file pairs, readable images, label sizes and values) before training",
    "convert": "convert an official OffSeg, SegFormer or SegNeXt (w/ offset learning) checkpoint into a Transformers folder",
    "demo": "web demo (Gradio) of one or more models, or a Hugging Face Space for them",
    "export": "export a model folder to ONNX (dynamic sizes, verified in ONNX Runtime)",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and appends ``(default: X)`` to options whose help does not state it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _command_module(name: str) -> ModuleType:
    return importlib.import_module(f"offseg_hf.cli.{name.replace('-', '_')}")


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("output")
    group.add_argument("--quiet", "-q", action="store_true", help="only warnings, errors and the final result; no progress bars")
    group.add_argument("--debug", action="store_true", help="show the full traceback when the command fails")
    return common


def build_parser(commands: dict[str, str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offseg", description="OffSeg semantic segmentation tools. Run 'offseg COMMAND --help' for a command's options.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"offseg-hf {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = _common_options()
    for name, help_text in (commands or COMMANDS).items():
        _add_command(subparsers, name, help_text, _command_module(name), common)
    return parser


def _add_command(subparsers, name: str, help_text: str, module: ModuleType, common: argparse.ArgumentParser):
    examples = getattr(module, "EXAMPLES", "").strip("\n")
    sub = subparsers.add_parser(
        name, help=help_text, description=(module.__doc__ or help_text).split("\n\n")[0].strip(),
        epilog=f"examples:\n{examples}" if examples else None, formatter_class=HelpFormatter, parents=[common],
    )
    sub.set_defaults(_command=name, _module=module)
    module.add_arguments(sub)
    return sub


def _quiet() -> None:
    import logging
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    logging.getLogger().setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_command", None) is None:
        parser.print_help()
        return 2
    return _run(args, f"offseg {args._command}", argv)


def run_tool(module: ModuleType, argv: list[str] | None = None, *, prog: str | None = None) -> int:
    """Run a command module outside the ``offseg`` dispatcher (the tools of ``benchmarks/`` and ``research/``):
    same options (``--quiet``, ``--debug``), help formatting and error handling as an ``offseg`` sub-command."""
    prog = prog or f"python -m {getattr(module.__spec__, 'name', None) or module.__name__}"  # not __main__
    parser = argparse.ArgumentParser(prog=prog, description=(module.__doc__ or "").split("\n\n")[0].strip(),
                                     formatter_class=HelpFormatter, parents=[_common_options()])
    examples = getattr(module, "EXAMPLES", "").strip("\n")
    parser.epilog = f"examples:\n{examples}" if examples else None
    module.add_arguments(parser)
    parser.set_defaults(_module=module)
    return _run(parser.parse_args(argv), prog, argv)


def _not_torchao_enum_notice(record) -> bool:
    """A logging filter that drops torch's line "<enum 'KernelPreference'> is an Enum subclass and is now natively
    supported by torch.compile …", printed twice by every command: ``import transformers`` loads its torchao
    quantizer, and torchao 0.18 registers two enums as pytree constants, which torch 2.14 deprecates. Nothing a user
    can act on; ``--debug`` keeps it."""
    return "is an Enum subclass and is now natively supported" not in record.getMessage()


def _run(args: argparse.Namespace, prog: str, argv: list[str] | None) -> int:
    args._argv = list(sys.argv[1:] if argv is None else argv)
    if not args.debug:
        import logging

        logging.getLogger("torch.utils._pytree").addFilter(_not_torchao_enum_notice)  # once: the same object
    if args.quiet:
        _quiet()
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - one clear line instead of a traceback; --debug shows it
        if args.debug:
            raise
        print(f"{prog}: error: {_one_line(error)}\n(run again with --debug to see the traceback)", file=sys.stderr)
        return 1


def _one_line(error: BaseException) -> str:
    """The message of ``error``; for errors re-raised from a DataLoader worker (whose text embeds the worker's
    traceback) the original exception's message only."""
    message = str(error) or type(error).__name__
    if "\nOriginal Traceback" in message:
        lines = message.rstrip().splitlines()
        for start in range(len(lines) - 1, -1, -1):  # the original message may span lines: from "Type: ..."
            if re.match(r"^[A-Za-z_.]*(Error|Exception): ", lines[start]):
                return "\n".join([lines[start].split(": ", 1)[1], *lines[start + 1:]])
    return message


if __name__ == "__main__":
    sys.exit(main())
