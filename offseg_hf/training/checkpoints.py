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
  :data:`STAGING_DIR`) and ``checkpoint-N`` folders that do not verify (:func:`checkpoint_problems`) are named
  and skipped.

Verified folders: :func:`publish_folder` writes a :data:`MANIFEST` (every file with its size and SHA-256) as the
folder's last file, before the rename. :func:`checkpoint_problems` checks a folder against it, or, for folders
saved before manifests existed, checks what can be checked without one (required files present and not empty,
safetensors headers against the file size, PyTorch zip archives complete).

Disk space: :func:`ensure_free_space` refuses a write the file system cannot hold before anything is written
(:class:`InsufficientSpaceError`, with the folder, the bytes needed and the bytes free); the atomic writers
remove their partial output when a write still fails (ENOSPC, EIO …), and :func:`describe_write_error` says
what went wrong in words (torch reports a full disk as ``unexpected pos …``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "MANIFEST",
    "STAGING_DIR",
    "InsufficientSpaceError",
    "StorageError",
    "atomic_output",
    "atomic_write_text",
    "checkpoint_problems",
    "describe_write_error",
    "discard_interrupted_saves",
    "ensure_free_space",
    "folder_bytes",
    "fsync_tree",
    "is_write_failure",
    "newest_complete_checkpoint",
    "publish_folder",
    "write_manifest",
]

# Sub-folder of a training run's output directory where checkpoints are written before they are renamed.
STAGING_DIR = ".incomplete"

# Written last into a published folder: {"format": 1, "files": {relative path: {"size": bytes, "sha256": hex}}}.
MANIFEST = "manifest.json"

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Files without which ``Trainer.train(resume_from_checkpoint=...)`` cannot continue exactly.
_REQUIRED = ("config.json", "trainer_state.json", "optimizer.pt", "scheduler.pt")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# Files only ``--resume`` reads (a model is loaded without them).
_TRAINING_STATE = re.compile(r"^(optimizer\.pt|scheduler\.pt|trainer_state\.json|training_args\.bin|rng_state.*\.pth)$")
# Errors of a write that the storage refused: full, over quota, too large, failing.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO}
# How writers that do not raise OSError report a refused write: torch's zip writer (a short write, no errno)
# and safetensors' Rust writer (``SafetensorError: ... No space left on device (os error 28)``).
_WRITE_FAILURE_TEXT = re.compile(r"unexpected pos|file write failed|PytorchStreamWriter failed|No space left on device|"
                                 r"Disk quota exceeded|Input/output error|os error (28|122|5)\b", re.IGNORECASE)
_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os error (28|122)\b", re.IGNORECASE)


class StorageError(OSError):
    """A write the storage refused or cannot hold; ``str()`` is the message alone (no ``[Errno N]`` prefix)."""

    def __str__(self) -> str:
        return str(self.strerror)


class InsufficientSpaceError(StorageError):
    """The file system cannot hold what is about to be written (raised before anything is written)."""


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

    Its :data:`MANIFEST` is written first (the folder's last file), then ``staged`` is flushed and the parent
    directory after, so after a crash either the old state or the complete new folder is on disk.
    """
    staged, destination = Path(staged), Path(destination)
    write_manifest(staged)
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
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if is_write_failure(error):
            raise StorageError(getattr(error, "errno", None) or errno.EIO, describe_write_error(error, path)) from error
        raise
    _fsync_directory(path.parent)
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike):
    """``with atomic_output("x.png") as temporary: image.save(temporary)``: the file is written under a
    temporary name with the same suffix (so writers that go by the suffix choose the same format), flushed,
    and renamed to ``path`` when the block succeeds; removed when it fails. A write the storage refused
    (full, over quota, failing) is raised as ``OSError`` with :func:`describe_write_error`'s message."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if is_write_failure(error):
            raise StorageError(getattr(error, "errno", None) or errno.EIO, describe_write_error(error, path)) from error
        raise


def _size_text(count: int) -> str:
    return f"{count / 2**20:,.1f} MiB ({count:,} bytes)"


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def folder_bytes(folder: str | os.PathLike) -> int:
    """Total size of the files under ``folder`` (0 when it does not exist)."""
    return sum(entry.stat().st_size for entry in Path(folder).rglob("*") if entry.is_file())


def ensure_free_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Raise :class:`InsufficientSpaceError` unless the file system of ``folder`` (or of its nearest existing
    parent) has ``needed`` bytes free; the message names the folder, ``what``, the bytes needed and free."""
    where = _existing_ancestor(Path(folder))
    free = shutil.disk_usage(where).free
    if free < needed:
        raise InsufficientSpaceError(
            errno.ENOSPC,
            f"not enough free space to write {what} in {folder}: it needs about {_size_text(needed)}, the file "
            f"system of {where} has {_size_text(free)} free; free some space (or choose another folder) and run again",
        )


def is_write_failure(error: BaseException) -> bool:
    """Whether ``error`` is the storage refusing a write: ``OSError`` ENOSPC / EDQUOT / EFBIG / EIO, torch's
    zip writer's short write (``unexpected pos …``, how a full disk looks from ``torch.save``), or another
    writer's error that says so (safetensors: ``No space left on device (os error 28)``)."""
    if isinstance(error, StorageError) or not isinstance(error, Exception):
        return False  # already says it all / Ctrl-C and exits are not write failures
    if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
        return True
    return bool(_WRITE_FAILURE_TEXT.search(str(error)))


def describe_write_error(error: BaseException, path: str | os.PathLike) -> str:
    """One sentence for a failed write of ``path``: what the storage said and the space left now."""
    path = Path(path)
    code = getattr(error, "errno", None)
    if code is None:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if _FULL_TEXT.search(message):
            code, cause = errno.ENOSPC, os.strerror(errno.ENOSPC) + f" ({type(error).__name__}: {message})"
        else:  # torch's short write: with the space shown below, the likely cause
            cause = f"a short write ({message})"
    else:
        cause = os.strerror(code) if code else str(error)
    try:
        free = shutil.disk_usage(_existing_ancestor(path)).free
        space = f"; {_size_text(free)} free there now"
    except OSError:
        free, space = None, ""
    if code in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < 2**20):
        cause = f"the disk is full or over quota: {cause}"
    return f"writing {path} failed: {cause}{space}; the partial output was removed"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike) -> Path:
    """Write ``folder/manifest.json``: every other file under ``folder`` with its size and SHA-256."""
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return atomic_write_text(folder / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1) + "\n")


def _safetensors_problem(path: Path) -> str | None:
    """Whether a safetensors file is whole: its header parses and its tensors end where the file ends."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a safetensors header (truncated)"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return f"its header claims {length:,} bytes but the file has {size:,} (truncated or not safetensors)"
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            return "its safetensors header is not valid JSON (damaged)"
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + length + end != size:
        return f"{size:,} bytes, its header describes {8 + length + end:,} (truncated or damaged)"
    return None


def checkpoint_problems(folder: str | os.PathLike, *, model_only: bool = False) -> list[str]:
    """What is wrong with the saved folder ``folder`` (empty list: it verifies), one line per file, each
    naming the file and the problem.

    With a :data:`MANIFEST`: every file it lists must exist with its size and SHA-256. Without one (folders
    saved before manifests): the files a checkpoint needs must be there and not empty, safetensors files must
    end where their header says, PyTorch files must be complete zip archives.

    Args:
        model_only: check only what loading the model reads (``offseg evaluate`` / ``predict`` on a checkpoint
            folder), not the optimizer, scheduler and trainer states ``--resume`` needs.
    """
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not folder.is_dir():
        return [f"{folder}: no such folder"]
    problems = []
    if manifest.is_file():
        try:
            listed = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        except (ValueError, KeyError, TypeError, OSError) as error:
            return [f"{manifest}: unreadable ({type(error).__name__}: {error})"]
        for name, entry in listed.items():
            if model_only and _TRAINING_STATE.match(name):
                continue
            path = folder / name
            if not path.is_file():
                problems.append(f"{path}: missing (the manifest lists {entry['size']:,} bytes)")
            elif path.stat().st_size != entry["size"]:
                problems.append(f"{path}: {path.stat().st_size:,} bytes, the manifest says {entry['size']:,} (truncated or replaced)")
            elif file_sha256(path) != entry["sha256"]:
                problems.append(f"{path}: SHA-256 differs from the manifest (the content changed or is damaged)")
    for name in _REQUIRED:
        if model_only and name != "config.json":
            continue
        path = folder / name
        if not path.is_file():
            if not any(line.startswith(f"{path}:") for line in problems):
                problems.append(f"{path}: missing")
        elif path.stat().st_size == 0 and not manifest.is_file():
            problems.append(f"{path}: empty")
    weights = [folder / name for name in _WEIGHTS if (folder / name).is_file()]
    if not weights and not any(Path(line.split(":")[0]).name in _WEIGHTS for line in problems):
        problems.append(f"{folder}: no model weights ({', '.join(_WEIGHTS)})")
    if not manifest.is_file():
        for path in sorted(folder.iterdir()):
            if not path.is_file() or path.stat().st_size == 0 or (model_only and _TRAINING_STATE.match(path.name)):
                continue
            if path.suffix == ".safetensors":
                problem = _safetensors_problem(path)
            elif path.suffix in (".pt", ".pth", ".bin"):
                problem = None if zipfile.is_zipfile(path) else "not a complete PyTorch (zip) file (truncated or damaged)"
            else:
                continue
            if problem:
                problems.append(f"{path}: {problem}")
        for path in weights:
            if path.stat().st_size == 0:
                problems.append(f"{path}: empty")
    return problems


def newest_complete_checkpoint(output_dir: str | os.PathLike) -> tuple[str | None, list[str]]:
    """The newest ``checkpoint-N`` under ``output_dir`` that verifies (:func:`checkpoint_problems`), and what
    was skipped on the way.

    Returns:
        ``(path or None, skipped)``: ``skipped`` has one line per interrupted save (a folder left in
        :data:`STAGING_DIR`) and one per problem of each ``checkpoint-N`` newer than the one chosen (every
        one when none verifies), each naming the folder or file and what is wrong.
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
        problems = checkpoint_problems(entry)
        if not problems:
            return str(entry), skipped
        skipped.extend(problems)
    return None, skipped


def discard_interrupted_saves(output_dir: str | os.PathLike) -> list[Path]:
    """Remove the folders interrupted saves left in ``output_dir``'s :data:`STAGING_DIR` (they can never be
    resumed from and may hold most of the free space); returns what was removed."""
    staging = Path(output_dir) / STAGING_DIR
    removed = sorted(staging.iterdir()) if staging.is_dir() else []
    for entry in removed:
        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        staging.rmdir()
    return removed
