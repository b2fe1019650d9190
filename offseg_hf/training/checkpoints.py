"""Folders and files that appear only when complete: staging, fsync, rename; finding complete checkpoints.

A kill (power loss, preemption, ``kill -9``) while the package writes must never leave something that looks
finished but is not. Everything is written under a temporary name next to its destination, flushed to disk
(``fsync``), then renamed into place with ``os.replace``, which is atomic on POSIX file systems:

* :func:`atomic_write_text`: one file (evaluation reports, JSON summaries); :func:`atomic_output` for files
  written by other libraries (PNG label maps and overlays of ``offseg predict``);
* :func:`fsync_tree` + :func:`publish_folder`: a folder (training checkpoints, see
  ``offseg_hf.training.train``: the Trainer writes ``checkpoint-N`` under :data:`STAGING_DIR` and the folder is
  renamed to ``output_dir/checkpoint-N`` after its last file);
* :func:`newest_complete_checkpoint`: the checkpoint ``--resume`` continues from; interrupted saves (left in
  :data:`STAGING_DIR`) and ``checkpoint-N`` folders that lack a file a checkpoint needs are named and skipped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "STAGING_DIR",
    "atomic_output",
    "atomic_write_text",
    "fsync_tree",
    "incomplete_reason",
    "newest_complete_checkpoint",
    "publish_folder",
]

# Sub-folder of a training run's output directory where checkpoints are written before they are renamed.
STAGING_DIR = ".incomplete"

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Files without which ``Trainer.train(resume_from_checkpoint=...)`` cannot continue exactly.
_REQUIRED = ("config.json", "trainer_state.json", "optimizer.pt", "scheduler.pt")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _fsync_directory(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file under ``folder`` and the folders themselves to disk."""
    folder = Path(folder)
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_directory(Path(root))


def publish_folder(staged: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Rename the finished folder ``staged`` to ``destination`` (replacing an older one of that name).

    ``staged`` is flushed first and the parent directory after, so after a crash either the old state or
    the complete new folder is on disk.
    """
    staged, destination = Path(staged), Path(destination)
    fsync_tree(staged)
    if destination.exists():  # the same step saved again (e.g. the final save after an interruption)
        old = destination.with_name(f"{STAGING_DIR}-old-{destination.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(destination, old)
        os.replace(staged, destination)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, destination)
    _fsync_directory(destination.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling file, fsync and rename; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike):
    """``with atomic_output("x.png") as temporary: image.save(temporary)``: the file is written under a
    temporary name with the same suffix (so writers that go by the suffix choose the same format), flushed,
    and renamed to ``path`` when the block succeeds; removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def incomplete_reason(checkpoint: str | os.PathLike) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (a missing or empty file), or ``None`` when it is complete."""
    checkpoint = Path(checkpoint)
    for name in _REQUIRED:
        file = checkpoint / name
        if not file.is_file():
            return f"no {name}"
        if file.stat().st_size == 0:
            return f"{name} is empty"
    weights = [checkpoint / name for name in _WEIGHTS if (checkpoint / name).is_file()]
    if not weights:
        return "no model weights"
    if all(w.stat().st_size == 0 for w in weights):
        return f"{weights[0].name} is empty"
    return None


def newest_complete_checkpoint(output_dir: str | os.PathLike) -> tuple[str | None, list[str]]:
    """The newest resumable ``checkpoint-N`` under ``output_dir``, and what was skipped on the way.

    Returns:
        ``(path or None, skipped)``: ``skipped`` has one line per interrupted save (a folder left in
        :data:`STAGING_DIR`) or incomplete ``checkpoint-N`` folder newer than the one chosen, naming it and
        its problem.
    """
    output_dir = Path(output_dir)
    skipped: list[str] = []
    staging = output_dir / STAGING_DIR
    if staging.is_dir():
        for entry in sorted(staging.iterdir()):
            skipped.append(f"{entry}: interrupted while being saved")
    if not output_dir.is_dir():
        return None, skipped
    steps = []
    for entry in output_dir.iterdir():
        match = _CHECKPOINT.match(entry.name)
        if match and entry.is_dir():
            steps.append((int(match.group(1)), entry))
    for _, entry in sorted(steps, reverse=True):
        reason = incomplete_reason(entry)
        if reason is None:
            return str(entry), skipped
        skipped.append(f"{entry}: incomplete ({reason})")
    return None, skipped
