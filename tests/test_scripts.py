"""scripts/: thin entry points (``python scripts/train.py``, ``accelerate launch scripts/train.py``) that run the same
commands as ``offseg <name>`` and the source-checkout tools (``python -m benchmarks.compare_models``)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMAND_SCRIPTS = {"train": "train", "evaluate": "evaluate", "predict": "predict", "convert": "convert",
                   "export": "export", "check_data": "check-data"}


def help_options(text):
    """The ``--options`` a help text lists (usage line and option list)."""
    return sorted({word.strip("[],") for word in text.split() if word.startswith(("--", "[--"))})


def run(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_every_script_is_listed():
    assert {path.stem for path in (ROOT / "scripts").glob("*.py")} == set(COMMAND_SCRIPTS) | {"benchmark", "mine_prototypes"}


@pytest.mark.parametrize("script", sorted(COMMAND_SCRIPTS))
def test_command_scripts_offer_the_commands_options(script):
    """The script's help is the sub-command's help (same options), whatever the working directory."""
    command = COMMAND_SCRIPTS[script]
    from_script = run(str(ROOT / "scripts" / f"{script}.py"), "--help", cwd=ROOT / "tests")
    from_cli = run("-m", "offseg_hf", command, "--help")
    assert from_script.returncode == 0 and from_cli.returncode == 0, from_script.stderr + from_cli.stderr
    assert help_options(from_script.stdout) == help_options(from_cli.stdout) and len(help_options(from_cli.stdout)) >= 2


def test_a_command_script_reports_errors_as_the_cli_does(tmp_path):
    result = run(str(ROOT / "scripts" / "check_data.py"), str(tmp_path / "missing"))
    assert result.returncode != 0 and "check-data" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("script,module", [("benchmark", "benchmarks.compare_models"), ("mine_prototypes", "research.mine_prototypes")])
def test_tool_scripts_run_the_checkout_tools_from_anywhere(script, module):
    from_script = run(str(ROOT / "scripts" / f"{script}.py"), "--help", cwd=ROOT / "tests")
    from_module = run("-m", module, "--help")
    assert from_script.returncode == 0 and from_module.returncode == 0, from_script.stderr + from_module.stderr
    assert f"python scripts/{script}.py" in from_script.stdout
    assert help_options(from_script.stdout) == help_options(from_module.stdout) and len(help_options(from_module.stdout)) >= 3
