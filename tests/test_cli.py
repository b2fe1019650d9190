"""The command line a new user meets first: fast help without torch, --version, documented options, and
mistakes (unknown model names, non-checkpoint files, empty inputs) reported at once, in one message."""

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_HUB_OFFLINE": "0"}

# Runs the console script's entry point (offseg_hf.cli.main, as `offseg` and `python -m offseg_hf` do) and reports
# whether torch, transformers or the models got imported, and every network attempt (audit events).
PROBE = """
import json, sys
events = []
sys.addaudithook(lambda event, args: events.append(event) if event.startswith("socket.") else None)
sys.path.insert(0, {repo!r})
from offseg_hf.cli import main
try:
    status = main({argv!r})
except SystemExit as exit:
    status = exit.code
print(json.dumps({{"status": status, "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules,
                  "models": "offseg_hf.models" in sys.modules, "network": sorted(set(events))}}), file=sys.stderr)
"""


def _probe(argv: list[str]) -> tuple[dict, str, str, float]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PROBE.format(repo=str(REPO), argv=argv)], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    report = json.loads(result.stderr.strip().splitlines()[-1])
    return report, result.stdout, result.stderr, seconds


COMMANDS = ["predict", "train", "evaluate", "check-data", "convert", "export"]


@pytest.mark.parametrize("argv", [["--help"], *[[name, "--help"] for name in COMMANDS]])
def test_help_is_fast_and_imports_neither_torch_nor_the_models(argv):
    report, out, _, seconds = _probe(argv)
    assert report["status"] == 0 and not report["torch"] and not report["transformers"] and not report["models"]
    assert seconds < 1.0, f"{' '.join(argv)} took {seconds:.2f} s"
    assert "usage: offseg" in out
    if argv != ["--help"]:
        assert "examples:\n  offseg " + argv[0] in out  # an example per sub-command


def test_python_m_offseg_hf_is_the_offseg_command():
    """``python -m offseg_hf`` (what ``accelerate launch -m offseg_hf`` / ``torchrun -m offseg_hf`` run) prints the
    same help as the console script, whose entry point is offseg_hf.cli:main."""
    import configparser

    _, expected, _, _ = _probe(["train", "--help"])
    result = subprocess.run([sys.executable, "-m", "offseg_hf", "train", "--help"], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout == expected
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert setup.get("options.entry_points", "console_scripts").strip() == "offseg = offseg_hf.cli:main"


@pytest.mark.parametrize("module", ["benchmarks.compare_models", "benchmarks.deploy", "research.mine_prototypes"])
def test_checkout_tools_run_with_the_cli_options(module):
    """The benchmark and research tools of the checkout are command modules run by offseg_hf.cli.run_tool."""
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"usage: python -m {module}" in result.stdout and "--debug" in result.stdout
    assert f"examples:\n  python -m {module}" in result.stdout


def test_version():
    report, out, _, _ = _probe(["--version"])
    from offseg_hf import __version__

    assert report["status"] == 0 and out.strip() == f"offseg-hf {__version__}" and not report["torch"]


def test_every_option_has_help_and_states_its_default():
    sys.path.insert(0, str(REPO))
    from offseg_hf.cli import HelpFormatter, build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"offseg {name} {action.option_strings[0]} has no help"
            shown = HelpFormatter("x")._get_help_string(action)
            has_default = action.default not in (None, False) and not isinstance(action.default, bool)
            if has_default:
                assert "default" in shown, f"offseg {name} {action.option_strings[0]}: default not shown"
    train = subparsers.choices["train"].format_help()
    assert "linear warm-up steps (default: 1500; synthetic 30)" in " ".join(train.split())


def test_train_help_defaults_are_the_resolved_ones():
    """The defaults the train help states for the synthetic quick start are what resolve_config produces."""
    from offseg_hf.training.train import resolve_config

    config = resolve_config({"dataset": "synthetic"}).training_args
    assert (config.max_steps, config.warmup_steps, config.learning_rate, config.global_batch_size) == (300, 30, 6e-4, 8)
    assert (config.eval_steps, config.save_steps, config.logging_steps, config.seed) == (100, 100, 10, 0)
    config = resolve_config({"dataset": "ade20k"}).training_args
    assert (config.max_steps, config.warmup_steps, config.learning_rate, config.eval_steps) == (160_000, 1500, 6e-5, 16_000)


@pytest.mark.parametrize("argv, expected", [
    (["train", "--dataset", "synthetic", "--model", "offseg-xl"],
     "unknown model 'offseg-xl': choose a preset (offseg-b, offseg-l, offseg-t, segnext-b, segnext-l, segnext-s, segnext-t, "
     "segnext-b-offset, segnext-l-offset, segnext-s-offset, segnext-t-offset, mask2former-swin-t, mask2former-swin-t-offset), an existing model folder, or a Hub id"),
    (["evaluate", "--dataset", "synthetic", "--model", "offseg-xl"], "model folder not found"),
    (["predict", "README.md", "--model", "offseg-xl", "--out", "/tmp/x"], "model folder not found"),
])
def test_unknown_model_names_fail_at_once_without_any_network_attempt(argv, expected):
    report, _, err, seconds = _probe(argv)
    assert report["status"] in (1, 2) and expected in err and "Traceback" not in err
    assert report["network"] == [], report["network"]  # no socket was even created: no Hub request
    assert seconds < 60


def test_predict_reports_missing_inputs_before_loading_the_model(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    # the model does not exist either: the inputs are reported first, so the model was never looked at
    report, _, err, _ = _probe(["predict", str(empty), str(tmp_path / "missing.jpg"), "--model", str(tmp_path / "m"),
                                "--out", str(tmp_path / "out")])
    assert report["status"] == 2
    assert f"{empty}: no image files" in err and f"{tmp_path / 'missing.jpg'}: no such file or directory" in err
    assert "no image to segment" in err and "model folder not found" not in err


@pytest.mark.parametrize("content, expected", [
    (os.urandom(4096), "is not a checkpoint: neither a PyTorch file"),
    (b"<!DOCTYPE html><html><body>Google Drive - virus scan warning</body></html>", "HTML/XML page"),
    ("zip", "is a zip archive but not a PyTorch checkpoint"),
])
def test_convert_tells_a_non_checkpoint_from_a_checkpoint(tmp_path, capsys, content, expected):
    from offseg_hf.cli import main

    path = tmp_path / "offseg-t_ade20k.pth"
    if content == "zip":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("notes.txt", "hello")
    else:
        path.write_bytes(content)
    assert main(["convert", str(path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert expected in err and str(path) in err
    assert "weights_only=False" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_quiet_training_prints_only_the_result_and_no_pin_memory_warning(tmp_path):
    from test_training import tiny_config
    import torch
    from offseg_hf import OffSegForSemanticSegmentation

    torch.manual_seed(0)
    OffSegForSemanticSegmentation(tiny_config()).save_pretrained(tmp_path / "model")
    result = subprocess.run(
        [sys.executable, "-m", "offseg_hf", "train", "--quiet", "--dataset", "synthetic", "--model", str(tmp_path / "model"),
         "--output-dir", str(tmp_path / "out"), "--max-steps", "2", "--global-batch-size", "2", "--num-labels", "4",
         "--image-size", "32", "--crop-size", "32", "--train-scale", "32", "32", "--train-samples", "4",
         "--eval-samples", "2", "--warmup-steps", "1", "--num-workers", "1", "--use-cpu"],
        cwd=REPO, env={**ENV, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("final mIoU") and len(result.stdout.strip().splitlines()) == 1
    assert "it/s" not in result.stderr and "{'loss'" not in result.stderr and "pin_memory" not in result.stderr
    assert "is an Enum subclass" not in result.stderr  # torchao's deprecation notice through transformers' import
