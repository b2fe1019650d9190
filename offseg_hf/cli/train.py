"""``offseg train``: train or fine-tune OffSeg with the paper's recipe (see :mod:`offseg_hf.training.train`).

The options are the fields of the argument dataclasses (``ModelArguments``, ``DataArguments`` and
``OffSegTrainingArguments``, a ``transformers.TrainingArguments``), parsed by ``transformers.HfArgumentParser``;
every ``TrainingArguments`` field is an option (``--bf16``, ``--push-to-hub --hub-model-id REPO`` …).
``--config FILE`` (JSON or YAML, keys = option names) sets several at once, and flags given on the command
line win over the file. Defaults marked "recipe" depend on the dataset (ADE20K / COCO-Stuff / Cityscapes /
Pascal Context as in the paper; synthetic: a CPU-sized run). The dataset is checked before training starts
(``offseg check-data``); checkpoints are written atomically with a manifest (sizes, SHA-256), ``--resume``
continues from the newest one that verifies (naming and skipping damaged ones), a save the disk cannot hold
stops with the bytes needed and free and leaves nothing partial, and Ctrl-C stops after the current step with a
checkpoint.

``--help`` is read from ``train_options.json`` (written by :func:`offseg_hf.training.write_cli_spec` from the
dataclasses; a test keeps it in sync), so that it answers without importing transformers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLES = """
  offseg train --dataset synthetic --output-dir outputs/quickstart --max-steps 300
  offseg train --dataset ade20k --data-dir data/ADEChallengeData2016 --model offseg-t --output-dir runs/t-ade
  offseg train --config my_run.yaml --resume
  accelerate launch -m offseg_hf train --dataset cityscapes --data-dir data/cityscapes --bf16 --output-dir runs/city
  torchrun --nproc_per_node 2 -m offseg_hf train --use-cpu --dataset synthetic --global-batch-size 8   # 2 CPU processes
"""

SPEC = Path(__file__).resolve().with_name("train_options.json")
_GROUPS = {"model": "model", "data": "data", "training": "training (OffSeg recipe)",
           "Trainer": "transformers.TrainingArguments (the remaining fields)", "run": "run"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of :func:`offseg_hf.training.argument_parser`, from their records: help and early checks only;
    :func:`run` parses the command line again with the ``HfArgumentParser`` itself."""
    parser.usage = "%(prog)s [OPTION ...]   (every option below; --config FILE sets them from JSON / YAML)"
    groups = {key: parser.add_argument_group(title) for key, title in _GROUPS.items()}
    for record in json.loads(SPEC.read_text()):
        # the CLI's own --debug (tracebacks) wins over TrainingArguments.debug, which config files can still set
        record["flags"] = [flag for flag in record["flags"] if flag not in parser._option_string_actions]
        if not record["flags"]:
            continue
        kwargs = {"dest": record["dest"], "help": record["help"], "default": argparse.SUPPRESS}
        if record["store_false"]:
            kwargs["action"] = "store_false"
        else:
            kwargs.update(nargs=record["nargs"], const=record["const"])
            if record["choices"]:
                kwargs["choices"] = record["choices"]
        groups[record["group"]].add_argument(*record["flags"], **kwargs)


def training_argv(args: argparse.Namespace) -> list[str]:
    """The command line of this ``train`` call without the sub-command and the common options."""
    argv = list(getattr(args, "_argv", None) or [])
    if argv and argv[0] == "train":
        argv = argv[1:]
    return [token for token in argv if token not in ("--quiet", "-q", "--debug")]


def resume_hint(args: argparse.Namespace) -> str:
    """The command line that continues this run."""
    import shlex

    argv = training_argv(args)
    if "--resume" not in argv:
        argv.append("--resume")
    return shlex.join(["offseg", "train", *argv])


def is_main_process() -> bool:
    """Whether this process reports: the only one, or rank 0 of a ``torchrun`` / ``accelerate launch`` run (both set
    ``RANK`` in every process they start; read before training initialises the process group)."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def run(args: argparse.Namespace) -> int:
    import logging
    import sys

    from offseg_hf.training.train import CheckpointSaveError, TrainingInterrupted, parse_train_argv, resolve_config, train

    main_process = is_main_process()
    # Every process of a multi-process run trains; only the main one talks (the others keep their errors).
    level = (logging.WARNING if args.quiet else logging.INFO) if main_process else logging.ERROR
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    given, config_file = parse_train_argv(training_argv(args))
    if args.quiet:
        given.setdefault("disable_tqdm", True)
    config = resolve_config(given, config_file)
    try:
        metrics = train(config, quiet=args.quiet)
    except TrainingInterrupted as stop:
        if not main_process:
            return 130
        where = f"checkpoint saved: {stop.checkpoint}" if stop.checkpoint else "no checkpoint could be saved"
        print(f"offseg train: stopped by {stop.signal_name} after step {stop.step}; {where}", file=sys.stderr)
        print(f"continue with:\n  {resume_hint(args)}", file=sys.stderr)
        return 130
    except CheckpointSaveError as failed:
        if not main_process:
            return 1
        kept = (f"the last complete checkpoint, {failed.last_complete}, is intact" if failed.last_complete
                else "no earlier checkpoint was saved")
        print(f"offseg train: error: {failed}\n{kept}; after freeing space, continue with:\n  {resume_hint(args)}",
              file=sys.stderr)
        return 1
    if not main_process:
        return 0
    print(f"final mIoU {100 * metrics.get('eval_mIoU', float('nan')):.2f}  "
          f"mAcc {100 * metrics.get('eval_mAcc', float('nan')):.2f}  "
          f"aAcc {100 * metrics.get('eval_aAcc', float('nan')):.2f}  -> {config.training_args.output_dir}")
    return 0
