"""Crash-safe checkpoints: a kill at any point of a save leaves only complete ``checkpoint-N`` folders, and
``--resume`` continues from the newest complete one exactly as an uninterrupted run; Ctrl-C stops after the
current step with a checkpoint and a resume hint. Verified checkpoints: a damaged newest checkpoint (truncated
weights, missing optimizer state, manifest mismatch) is named and skipped for the previous one. Disk space: a
save the file system cannot hold fails before writing, and a save that hits a real ENOSPC leaves nothing
partial (tmpfs mounts; root only)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offseg_hf import OffSegForSemanticSegmentation
from offseg_hf.training.checkpoints import (
    MANIFEST, STAGING_DIR, atomic_output, atomic_write_text, checkpoint_problems, newest_complete_checkpoint,
)

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
    assert all(checkpoint_problems(output / name) == [] for name in visible)

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
    assert checkpoint_problems(output / "checkpoint-3") == []

    resumed = _run(_args(tiny_model_dir, output, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {output / 'checkpoint-3'}" in resumed.stderr
    losses = _losses(output)
    for step in range(1, 7):
        assert losses[step] == pytest.approx(reference[step], rel=1e-5), step


def _legacy_checkpoint(folder: Path, skip=()) -> Path:
    """A checkpoint folder as saved before manifests: real safetensors / torch files, no manifest."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    for name in ("config.json", "trainer_state.json"):
        if name not in skip:
            (folder / name).write_text("{}")
    for name in ("optimizer.pt", "scheduler.pt"):
        if name not in skip:
            torch.save({"state": torch.arange(1000)}, folder / name)
    if "model.safetensors" not in skip:
        save_file({"weight": torch.ones(64, 64)}, folder / "model.safetensors")
    return folder


def test_newest_complete_checkpoint_names_and_skips_incomplete_ones(tmp_path):
    assert newest_complete_checkpoint(tmp_path) == (None, [])
    _legacy_checkpoint(tmp_path / "checkpoint-2")
    _legacy_checkpoint(tmp_path / "checkpoint-4", skip=("trainer_state.json",))
    (_legacy_checkpoint(tmp_path / "checkpoint-6") / "config.json").write_text("")
    truncated = _legacy_checkpoint(tmp_path / "checkpoint-8") / "model.safetensors"
    whole = truncated.stat().st_size
    truncated.write_bytes(truncated.read_bytes()[:5000])
    cut = _legacy_checkpoint(tmp_path / "checkpoint-10") / "optimizer.pt"
    cut.write_bytes(cut.read_bytes()[:-100])
    (tmp_path / STAGING_DIR / "checkpoint-12").mkdir(parents=True)
    path, skipped = newest_complete_checkpoint(tmp_path)
    assert path == str(tmp_path / "checkpoint-2")
    assert skipped == [f"{tmp_path / STAGING_DIR / 'checkpoint-12'}: interrupted while being saved",
                       f"{cut}: not a complete PyTorch (zip) file (truncated or damaged)",
                       f"{truncated}: 5,000 bytes, its header describes {whole:,} (truncated or damaged)",
                       f"{tmp_path / 'checkpoint-6' / 'config.json'}: empty",
                       f"{tmp_path / 'checkpoint-4' / 'trainer_state.json'}: missing"]


def test_manifest_names_the_changed_file_and_model_only_checks_skip_training_state(tmp_path):
    from offseg_hf.training.checkpoints import write_manifest

    folder = _legacy_checkpoint(tmp_path / "checkpoint-2")
    write_manifest(folder)
    listed = json.loads((folder / MANIFEST).read_text())["files"]
    assert sorted(listed) == ["config.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"]
    assert listed["model.safetensors"]["size"] == (folder / "model.safetensors").stat().st_size
    assert checkpoint_problems(folder) == []
    weights = bytearray((folder / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF  # same size, header intact: only the hash can tell
    (folder / "model.safetensors").write_bytes(bytes(weights))
    (folder / "optimizer.pt").unlink()
    assert checkpoint_problems(folder) == [
        f"{folder / 'model.safetensors'}: SHA-256 differs from the manifest (the content changed or is damaged)",
        f"{folder / 'optimizer.pt'}: missing (the manifest lists {listed['optimizer.pt']['size']:,} bytes)",
    ]
    assert checkpoint_problems(folder, model_only=True) == [checkpoint_problems(folder)[0]]


def test_resume_with_no_checkpoint_that_verifies_lists_what_was_checked(tmp_path):
    from offseg_hf.training.train import CheckpointError, last_checkpoint

    weights = _legacy_checkpoint(tmp_path / "checkpoint-2") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (_legacy_checkpoint(tmp_path / "checkpoint-4") / "scheduler.pt").unlink()
    with pytest.raises(CheckpointError) as raised:
        last_checkpoint(tmp_path)
    message = str(raised.value)
    assert f"no checkpoint in {tmp_path} verifies" in message
    assert f"{tmp_path / 'checkpoint-4' / 'scheduler.pt'}: missing" in message
    assert f"{weights}: 100 bytes, its header describes" in message


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


@pytest.fixture(scope="module")
def stopped_after_checkpoint_4(tiny_model_dir, tmp_path_factory) -> Path:
    """A run killed as it began saving checkpoint-6: checkpoint-2 and checkpoint-4 are complete, with manifests."""
    output = tmp_path_factory.mktemp("stopped") / "run"
    killed = _run(_args(tiny_model_dir, output), KILL_IN="checkpoint-6", KILL_AT="1")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert all((output / name / MANIFEST).is_file() for name in ("checkpoint-2", "checkpoint-4"))
    return output


def _truncate_weights(checkpoint: Path) -> str:
    weights = checkpoint / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: size // 2])  # a failing disk, a partial rsync, a quota
    return f"{weights}: {size // 2:,} bytes, the manifest says {size:,} (truncated or replaced)"


def _remove_optimizer(checkpoint: Path) -> str:
    listed = json.loads((checkpoint / MANIFEST).read_text())["files"]["optimizer.pt"]["size"]
    (checkpoint / "optimizer.pt").unlink()
    return f"{checkpoint / 'optimizer.pt'}: missing (the manifest lists {listed:,} bytes)"


def _change_scheduler(checkpoint: Path) -> str:
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"]["scheduler.pt"]["sha256"] = "0" * 64  # the file no longer matches what was saved
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))
    return f"{checkpoint / 'scheduler.pt'}: SHA-256 differs from the manifest (the content changed or is damaged)"


@pytest.mark.slow  # ~15 s each on the shared 2-core CPU, plus the killed run and the reference run
@pytest.mark.parametrize("damage", [_truncate_weights, _remove_optimizer, _change_scheduler],
                         ids=["truncated-weights", "missing-optimizer", "manifest-mismatch"])
def test_resume_names_and_skips_a_damaged_newest_checkpoint(tiny_model_dir, tmp_path, reference,
                                                            stopped_after_checkpoint_4, damage):
    output = tmp_path / "run"
    shutil.copytree(stopped_after_checkpoint_4, output)
    expected = damage(output / "checkpoint-4")
    resumed = _run(_args(tiny_model_dir, output, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"--resume: skipping {expected}" in resumed.stderr
    assert f"resuming from {output / 'checkpoint-2'}" in resumed.stderr
    losses = _losses(output)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    for step in range(3, 7):
        assert losses[step] == pytest.approx(reference[step], rel=1e-5), step
    assert checkpoint_problems(output / "checkpoint-4") == []  # saved again, whole


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk("2m")``: a fresh tmpfs of that size (root only: the test is skipped, naming why, elsewhere)."""
    mounted = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"disk-{len(mounted)}"
        folder.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a {size} tmpfs to fill (needs root): {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_save_the_disk_cannot_hold_fails_before_writing(tiny_model_dir, small_disk):
    output = small_disk("160k") / "run"
    failed = _run(_args(tiny_model_dir, output, "--max-steps", "2"))
    assert failed.returncode == 1, failed.stderr[-3000:]
    needed, free = (int(n.replace(",", "")) for n in
                    __import__("re").search(r"needs about [\d.,]+ MiB \(([\d,]+) bytes\), the file system of .* has "
                                            r"[\d.,]+ MiB \(([\d,]+) bytes\) free", failed.stderr).groups())
    assert f"saving checkpoint-2 failed: not enough free space to write checkpoint-2 in {output}" in failed.stderr
    assert needed > free
    assert "no earlier checkpoint was saved; after freeing space, continue with:" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert sorted(p.name for p in output.iterdir()) == ["run_info.json", "train_config.json"]  # nothing of the save


@pytest.mark.slow  # a run killed by a full disk and its resume: ~25 s on the shared 2-core CPU
def test_a_real_enospc_during_a_save_leaves_no_partial_folder_and_resume_continues(tiny_model_dir, small_disk,
                                                                                   reference):
    disk = small_disk("8m")
    output, filler = disk / "run", disk / "other-program.bin"
    # the pre-check of checkpoint-4 passes; then another program fills the disk before its config.json is written
    failed = _run(_args(tiny_model_dir, output), KILL_IN="checkpoint-4", KILL_AT="before:config.json",
                  FILL_FILE=str(filler))
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert "offseg train: error: saving checkpoint-4 failed: writing " in failed.stderr
    assert "the disk is full or over quota: No space left on device" in failed.stderr
    assert "the partial output was removed; a checkpoint here takes about " in failed.stderr
    assert f"the last complete checkpoint, {output / 'checkpoint-2'}, is intact" in failed.stderr
    assert "after freeing space, continue with:\n  offseg train --dataset synthetic" in failed.stderr
    assert "--save-total-limit 3 --resume\n" in failed.stderr and "Traceback" not in failed.stderr
    assert not (output / STAGING_DIR).exists()
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2"]

    filler.unlink()
    resumed = _run(_args(tiny_model_dir, output, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {output / 'checkpoint-2'}" in resumed.stderr
    losses = _losses(output)
    for step in range(3, 7):
        assert losses[step] == pytest.approx(reference[step], rel=1e-5), step


def test_predict_on_a_damaged_checkpoint_names_the_file(tiny_model_dir, tmp_path, capsys):
    from offseg_hf.cli import main
    from offseg_hf.training.checkpoints import write_manifest

    checkpoint = tmp_path / "checkpoint-8"
    shutil.copytree(tiny_model_dir, checkpoint)
    write_manifest(checkpoint)
    weights = checkpoint / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:-10])
    image = tmp_path / "scene.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (90, 140, 40)).save(image)
    assert main(["predict", str(image), "--model", str(checkpoint), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert f"checkpoint {checkpoint} is damaged or incomplete: {weights}: {size - 10:,} bytes, the manifest says {size:,}" in error
    assert not (tmp_path / "out").exists()


def test_predict_on_a_full_disk_stops_and_leaves_no_partial_files(tiny_model_dir, tmp_path, small_disk, capsys):
    import numpy as np
    from PIL import Image

    from offseg_hf.cli import main

    image = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (192, 256, 3), dtype=np.uint8)).save(image)
    out = small_disk("64k") / "predictions"
    status = main(["predict", str(image), "--model", str(tiny_model_dir), "--out", str(out), "--scale", "64", "48", "--quiet"])
    error = capsys.readouterr().err
    assert status == 1, error
    assert "offseg predict: error: writing " in error and "the disk is full or over quota: No space left on device" in error
    assert f"the partial output was removed; stopped after 0 complete image(s) in {out}" in error
    assert list(out.iterdir()) == []  # not the label map written before the overlay ran out of space, nor a temporary


def test_convert_on_a_full_disk_leaves_no_partial_folder(small_disk):
    from offseg_hf.conversion.accounting import ConversionError
    from offseg_hf.conversion.convert import convert_checkpoint

    disk = small_disk("4m")  # OffSeg-T's weights take 25 MB
    with pytest.raises(ConversionError, match=r"failed: the disk is full or over quota: No space left on device "
                                              r"\(SafetensorError: .*\); .* free there now; the partial output was removed"):
        convert_checkpoint(Path(__file__).parent / "fixtures" / "offseg-t_official.safetensors", disk / "offseg-t")
    assert list(disk.iterdir()) == []
