"""Reading checkpoint files safely: safetensors, or ``torch.load(weights_only=True)`` and nothing else.

:func:`read_checkpoint` returns ``(state_dict, meta)`` of an mmsegmentation / mmengine checkpoint, an ImageNet
classification checkpoint or a bare state dict; it tells a damaged or non-checkpoint file from one that holds
Python objects, and never runs code from the file.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from offseg_hf.conversion.accounting import ConversionError

logger = logging.getLogger(__name__)

__all__ = ["read_checkpoint"]


class _InertObject:
    """Base of the stand-ins :func:`read_checkpoint` builds for non-tensor Python objects in a checkpoint."""


def _inert_class(qualified_name: str) -> type:
    """An inert class named like ``qualified_name``: constructing or restoring it runs nothing from the file."""
    module, _, name = qualified_name.rpartition(".")

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    return type(
        name,
        (_InertObject,),
        {
            "__module__": module,
            "__qualname__": name,
            "__new__": __new__,
            "__init__": lambda self, *args, **kwargs: None,
            "__setstate__": lambda self, state: None,
            "__repr__": lambda self: f"<{qualified_name} (not read)>",
        },
    )


def _load_with_inert_objects(path: Path, first_error: Exception):
    """Second ``weights_only=True`` attempt for checkpoints that also pickle bookkeeping objects.

    mmengine checkpoints carry e.g. ``message_hub`` (``HistoryBuffer`` objects holding numpy arrays) next to
    ``state_dict``. The globals those objects need are answered with inert stand-ins (allow-listed via
    ``torch.serialization.safe_globals``), so the unpickler stays restricted and no code from the file runs;
    the stand-ins are dropped afterwards and only tensors are used.
    """
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        with torch.serialization.safe_globals([_inert_class(name) for name in names]):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise ConversionError(
            f"{path} holds Python objects besides tensors that torch.load(weights_only=True) refuses to unpickle "
            f"({first_error}; {error}). Only if you trust the file, keep just its weights in a trusted environment and "
            "convert that file:\n"
            f"  python -c \"import torch; c = torch.load('{path}', map_location='cpu', weights_only=False); "
            f"torch.save({{'state_dict': c['state_dict'], 'meta': {{}}}}, '{path.with_suffix('')}-weights.pth')\""
        ) from error
    logger.info("%s: ignored non-tensor objects of types %s (not needed for the weights)", path, ", ".join(names))
    return payload


def _without_inert(value):
    """``value`` with inert stand-ins removed (dicts, lists, tuples walked)."""
    if isinstance(value, _InertObject):
        return None
    if isinstance(value, Mapping):
        return {k: _without_inert(v) for k, v in value.items() if not isinstance(v, _InertObject)}
    if isinstance(value, (list, tuple)):
        return type(value)(_without_inert(v) for v in value if not isinstance(v, _InertObject))
    return value


def _identify_pytorch_file(path: Path) -> None:
    """Raise unless ``path`` looks like a file ``torch.save`` wrote: a complete zip archive with a ``data.pkl``
    record, or a legacy (pre-1.6) pickle. Only then can "holds Python objects besides tensors" be the problem;
    anything else is not a checkpoint, and nothing in it is worth unpickling."""
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            raise ConversionError(
                f"cannot read {_describe(path)}: a zip archive that is truncated or damaged; download it again and "
                "compare its size with the original"
            )
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                raise ConversionError(f"{_describe(path)} is a zip archive but not a PyTorch checkpoint (no data.pkl)")
        return
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # pickle protocol 2-5
        return
    hint = " (it starts like an HTML/XML page: a failed download?)" if head.lstrip()[:1] == b"<" else ""
    raise ConversionError(
        f"{_describe(path)} is not a checkpoint: neither a PyTorch file (a zip archive or a legacy pickle) nor "
        f"safetensors (first bytes {head!r}){hint}; check the file name and download it again"
    )


def _describe(path: Path) -> str:
    try:
        size = path.stat().st_size
    except OSError:
        return str(path)
    return f"{path} ({size:,} bytes)"


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint file into ``(state_dict, meta)``.

    Accepts ``.safetensors`` files and PyTorch files (``torch.load(..., weights_only=True)``: no
    arbitrary code runs). A PyTorch file may hold an mmsegmentation checkpoint (``{"state_dict": ...,
    "meta": ...}``), an ImageNet classification checkpoint (``{"model": ...}``) or a bare state dict.
    Python objects next to the weights (mmengine's ``message_hub``, numpy scalars in ``meta`` …), which
    ``weights_only`` refuses to build, are read as inert stand-ins and ignored (see
    :func:`_load_with_inert_objects`); only such objects *inside* the state dict are an error.

    Returns:
        ``state_dict``: ``{key: tensor}`` (an mmsegmentation ``state_dict``, or the ``model`` entry);
        ``meta``: the ``meta`` entry (``{}`` if absent).

    Raises:
        FileNotFoundError: no such file.
        ConversionError: unreadable (truncated, not a checkpoint) or holding non-tensor objects that
            ``weights_only`` loading refuses (the message says how to re-save the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (or is not a file)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path))), {}
        except (SafetensorError, OSError, ValueError) as error:
            raise ConversionError(f"cannot read {_describe(path)} as safetensors: {error}") from error
    _identify_pytorch_file(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types; all mean "cannot read"
        message = str(error)
        if "Weights only load failed" not in message and "weights_only" not in message:
            if isinstance(error, (zipfile.BadZipFile, EOFError, RuntimeError)) or "zip" in message.lower():
                raise ConversionError(
                    f"cannot read {_describe(path)}: the file is truncated or not a PyTorch checkpoint ({message}); "
                    "download it again and compare its size with the original"
                ) from error
            raise ConversionError(f"cannot read {_describe(path)}: {type(error).__name__}: {message}") from error
        payload = _load_with_inert_objects(path, error)
    if not isinstance(payload, Mapping):
        raise ConversionError(f"{path} holds a {type(payload).__name__}, not a checkpoint dict")
    for key in ("state_dict", "model", "model_ema"):
        if key in payload and isinstance(payload[key], Mapping):
            inert = sorted(k for k, v in payload[key].items() if isinstance(v, _InertObject))
            if inert:
                raise ConversionError(
                    f"{path}: the weights themselves contain Python objects that torch.load(weights_only=True) will not "
                    f"build ({', '.join(f'{k!r}: {payload[key][k]!r}' for k in inert[:5])}). Only if you trust the file, "
                    "re-save the tensors in a trusted environment and convert that file:\n"
                    f"  python -c \"import torch; c = torch.load('{path}', map_location='cpu', weights_only=False); "
                    f"torch.save({{'state_dict': {{k: torch.as_tensor(v) for k, v in c['state_dict'].items()}}}}, "
                    f"'{path.with_suffix('')}-weights.pth')\""
                )
    meta = _without_inert(payload.get("meta")) or {}
    for key in ("state_dict", "model", "model_ema"):
        if key in payload and isinstance(payload[key], Mapping):
            state_dict = payload[key]
            break
    else:
        state_dict = payload
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConversionError(
            f"{path} contains no tensors (top-level keys: {sorted(map(str, payload))[:10]}); "
            "expected an mmsegmentation checkpoint with a 'state_dict' entry"
        )
    others = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if others:
        raise ConversionError(f"{path}: state-dict entries that are not tensors: {others[:10]}")
    return dict(tensors), dict(meta) if isinstance(meta, Mapping) else {}
