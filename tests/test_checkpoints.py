"""Crash-safe checkpoints: a kill at any point of a save leaves only complete ``checkpoint-N`` folders, and
``--resume`` continues from the newest complete one exactly as an uninterrupted run; Ctrl-C stops after the
current step with a checkpoint and a resume hint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offseg_hf import OffSegForSemanticSegmentation
from offseg_hf.training.checkpoints import STAGING_DIR, atomic_write_text, incomplete_reason, newest_complete_checkpoint

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "tests" / "kill_during_save.py"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from test_training import tiny_config

    path = tmp_path_factory.mktemp("tiny_ckpt_model")
    torch.manual_seed(0)
    OffSegForSemanticSegmentation(tiny_config()).save_pretrained(path)
    return path


def _args(model_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--dataset", "synthetic", "--model", str(model_dir), "--output-dir", str(output_dir), "--max-steps", "6",
        "--global-batch-size", "2", "--num-labels", "4", "--image-size", "32", "--crop-size", "32",
        "--train-scale", "32", "32", "--train-samples", "6", "--eval-samples", "2", "--eval-batch-size", "2",
        "--warmup-steps", "2", "--learning-rate", "1e-3", "--logging-steps", "1", "--num-workers", "0",
        "--use-cpu", "--save-steps", "2", "--save-total-limit", "3", *extra,
    ]


def _run(args: list[str], **env_extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **{"KILL_IN": "-", **env_extra})
    return subprocess.run([sys.executable, str(HELPER), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600, start_new_session=True)


def _losses(output_dir: Path) -> dict[int, float]:
    history = json.loads((output_dir / "log_history.json").read_text())
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory) -> dict[int, float]:
    output = tmp_path_factory.mktemp("uninterrupted")
    result = _run(_args(tiny_model_dir, output))
    assert result.returncode == 0, result.stderr[-3000:]
    losses = _losses(output)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    return losses


# (save that is hit, write event of that save at which the process dies, checkpoint the resume must use).
# Events of a save of checkpoint-4 (tests/kill_during_save.py): the first remote-code file, config.json (the
# weights follow it), trainer_state.json (optimizer, scheduler and RNG states are written before it, by torch),
# the rename into place; dying at checkpoint-6's first event = after checkpoint-4's rename.
KILL_POINTS = [("checkpoint-4", "before:modeling_offseg.py", 2), ("checkpoint-4", "before:config.json", 2),
               ("checkpoint-4", "before:trainer_state.json", 2), ("checkpoint-4", "rename", 2),
               ("checkpoint-6", "1", 4)]


@pytest.mark.slow  # 22-26 s each on the shared 2-core CPU (pytest --durations), plus a 25 s reference run
@pytest.mark.parametrize("fragment, event, resumed_from", KILL_POINTS)
def test_sigkill_during_save_then_resume_is_identical(tiny_model_dir, tmp_path, reference, fragment, event,
                                                      resumed_from):
    output = tmp_path / "run"
    killed = _run(_args(tiny_model_dir, output), KILL_IN=fragment, KILL_AT=str(event))
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-2000:])
    visible = sorted(p.name for p in output.iterdir() if p.name.startswith("checkpoint-"))
    assert visible == [f"checkpoint-{s}" for s in range(2, resumed_from + 1, 2)]  # only complete folders show
    assert all(incomplete_reason(output / name) is None for name in visible)

    resumed = _run(_args(tiny_model_dir, output, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {output / f'checkpoint-{resumed_from}'}" in resumed.stderr
    if resumed_from == 2:
        assert f"skipping {output / STAGING_DIR / fragment}: interrupted while being saved" in resumed.stderr
    losses = _losses(output)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    for step in range(resumed_from + 1, 7):
        assert losses[step] == pytest.approx(reference[step], rel=1e-5), step
    assert json.loads((output / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6
    assert not (output / STAGING_DIR).exists()


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_prints_the_resume_command_and_resume_is_identical(tiny_model_dir, tmp_path,
                                                                                     reference):
    output = tmp_path / "run"
    # Ctrl-C (SIGINT to the process group) arrives while checkpoint-2 is being saved, i.e. during step 2's
    # end: training finishes step 3, saves checkpoint-3 and stops
    interrupted = _run(_args(tiny_model_dir, output, "--num-workers", "1"), KILL_IN="checkpoint-2", KILL_AT="3",
                       KILL_SIGNAL="SIGINT")
    assert interrupted.returncode == 130, interrupted.stderr[-3000:]
    assert "Traceback" not in interrupted.stderr
    assert f"stopped by SIGINT after step 3; checkpoint saved: {output / 'checkpoint-3'}" in interrupted.stderr
    assert "continue with:\n  offseg train --dataset synthetic" in interrupted.stderr
    assert interrupted.stderr.rstrip().endswith("--resume")
    assert incomplete_reason(output / "checkpoint-3") is None

    resumed = _run(_args(tiny_model_dir, output, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {output / 'checkpoint-3'}" in resumed.stderr
    losses = _losses(output)
    for step in range(1, 7):
        assert losses[step] == pytest.approx(reference[step], rel=1e-5), step


def test_newest_complete_checkpoint_names_and_skips_incomplete_ones(tmp_path):
    def checkpoint(step, skip=()):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name in ("config.json", "trainer_state.json", "optimizer.pt", "scheduler.pt", "model.safetensors"):
            if name not in skip:
                (folder / name).write_text("x")
        return folder

    assert newest_complete_checkpoint(tmp_path) == (None, [])
    checkpoint(2)
    checkpoint(4, skip=("trainer_state.json",))
    empty = checkpoint(6)
    (empty / "config.json").write_text("")
    (tmp_path / STAGING_DIR / "checkpoint-8").mkdir(parents=True)
    path, skipped = newest_complete_checkpoint(tmp_path)
    assert path == str(tmp_path / "checkpoint-2")
    assert skipped == [f"{tmp_path / STAGING_DIR / 'checkpoint-8'}: interrupted while being saved",
                       f"{tmp_path / 'checkpoint-6'}: incomplete (config.json is empty)",
                       f"{tmp_path / 'checkpoint-4'}: incomplete (no trainer_state.json)"]


def test_atomic_write_text_replaces_whole_files_only(tmp_path):
    target = atomic_write_text(tmp_path / "sub" / "report.json", "new")
    assert target.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it, not mkstemp's 0600
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]  # no temporary left behind


def test_best_model_needs_every_checkpoint_evaluated(caplog):
    """load_best_model_at_end stays on: save steps are aligned to eval steps with a logged message, or refused with
    a value that works; it is never switched off silently."""
    import logging

    from offseg_hf.training.train import resolve_config

    with pytest.raises(ValueError, match=r"save_steps 3 is not a multiple of eval_steps 2.*--save-steps 4"):
        resolve_config({"save_steps": 3, "eval_steps": 2})
    with pytest.raises(ValueError, match=r"save_steps 3 is not a multiple of eval_steps 2"):  # from a config file too
        resolve_config({"save_steps": 3, "eval_steps": 2, "load_best_model_at_end": True})
    with caplog.at_level(logging.WARNING, logger="offseg_hf.training"):
        args = resolve_config({"save_steps": 7}).training_args  # only checkpoints asked for: evaluate at each
    assert args.eval_steps == 7 and args.load_best_model_at_end
    assert "--save-steps 7 is not a multiple of the recipe's eval steps 100: evaluating every 7 steps" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="offseg_hf.training"):
        args = resolve_config({"save_steps": 200}).training_args  # already a multiple of the recipe's 100
    assert args.eval_steps == 100 and args.load_best_model_at_end and caplog.text == ""
    args = resolve_config({}).training_args
    assert args.save_steps == args.eval_steps == 100 and args.load_best_model_at_end
    # without the best model, checkpoints need not be evaluated
    args = resolve_config({"save_steps": 3, "eval_steps": 2, "load_best_model_at_end": False}).training_args
    assert (args.save_steps, args.eval_steps, args.load_best_model_at_end) == (3, 2, False)
