"""The ``offseg`` command line: a dispatcher over ``offseg_hf/commands/<name>.py``.

A sub-command is one entry of :data:`COMMANDS` and one module ``offseg_hf/commands/<name>.py`` with

* ``add_arguments(parser)``: its options (every option with a help text that states its real default);
* ``run(args) -> int``: the work, returning the exit status;
* ``EXAMPLES``: example command lines, shown at the end of ``offseg <name> --help``.

Speed: ``offseg --help`` and ``offseg <name> --help`` must answer at once, so this module and the command
modules import nothing heavy at top level (torch, transformers, datasets are imported inside ``run``). The
console script enters through ``offseg_cli.main``, which executes this file without importing the
``offseg_hf`` package (whose ``__init__`` loads torch and transformers); the command modules are then read
from their files for parsing, and imported as ``offseg_hf.commands.<name>`` only to run.

Errors: a failing command prints one line, ``offseg <name>: error: <message>``, and exits with status 1 (2 for
invalid arguments, 130 on Ctrl-C); ``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import sys
from pathlib import Path

# name -> one-line help; the module offseg_hf/commands/<name>.py implements it. One line per sub-command.
COMMANDS = {
    "predict": "segment images and write label maps, overlays and class statistics",
    "train": "train or fine-tune an OffSeg model with the paper's recipe",
    "evaluate": "compute mIoU / mAcc / aAcc of a model on a dataset split",
    "check-data": "check a dataset (file pairs, readable images, label sizes and values) before training",
    "convert": "convert an official OffSeg, SegFormer or SegNeXt (w/ offset learning) checkpoint into a Transformers folder",
    "benchmark": "parameters, MACs and CPU latency next to SegFormer",
    "prototypes": "ideal class representations (Eq. 2) and Fig. 3 heat maps",
    "demo": "web demo (Gradio) of one or more models, or a Hugging Face Space for them",
}

_PACKAGE_DIR = Path(__file__).resolve().parent


def version() -> str:
    """The package version, read from ``offseg_hf/__init__.py`` without importing it."""
    match = re.search(r'^__version__ = "([^"]+)"', (_PACKAGE_DIR / "__init__.py").read_text(), re.MULTILINE)
    return match.group(1) if match else "unknown"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and appends ``(default: X)`` to options whose help does not state it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def _module_name(name: str) -> str:
    return name.replace("-", "_")


def _command_module(name: str, *, to_run: bool):
    """The module of sub-command ``name``: imported for running; for parsing, read from its file when the
    ``offseg_hf`` package is not imported yet (so that ``--help`` stays free of torch). ``None`` if absent."""
    module = _module_name(name)
    if to_run or "offseg_hf" in sys.modules:
        try:
            return importlib.import_module(f"offseg_hf.commands.{module}")
        except ModuleNotFoundError as error:
            if error.name != f"offseg_hf.commands.{module}":
                raise
            return None
    path = _PACKAGE_DIR / "commands" / f"{module}.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location(f"_offseg_cli_{module}", path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


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
    parser.add_argument("--version", action="version", version=f"offseg-hf {version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = _common_options()
    for name, help_text in (commands or COMMANDS).items():
        module = _command_module(name, to_run=False)
        if module is None:  # not part of this installation
            continue
        examples = getattr(module, "EXAMPLES", "").strip("\n")
        sub = subparsers.add_parser(
            name, help=help_text, description=(module.__doc__ or help_text).split("\n\n")[0].strip(),
            epilog=f"examples:\n{examples}" if examples else None, formatter_class=HelpFormatter, parents=[common],
        )
        sub.set_defaults(_command=name)
        module.add_arguments(sub)
    return parser


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
    args._argv = list(sys.argv[1:] if argv is None else argv)
    if args.quiet:
        _quiet()
    prog = f"offseg {args._command}"
    try:
        module = _command_module(args._command, to_run=True)
        return int(module.run(args) or 0)
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
