"""Segment image files and write, per image, a label map, an overlay and class statistics (``offseg predict``).

For an input ``photo.jpg`` the output folder receives

* ``photo_labels.png``: palette-mode PNG, pixel value = class index, colours = the dataset palette
  (:func:`offseg_hf.inference.visualize.resolve_palette`);
* ``photo_overlay.png``: image and prediction side by side with a legend of the classes present;
* ``photo.json``: image size, settings, and every class present with its pixel count and fraction
  (fractions sum to 1).

Images are read upright as 8-bit RGB (:func:`offseg_hf.inference.image_io.load_image`: EXIF rotation applied, alpha
dropped, 16-bit scaled); an unreadable file is reported by name and skipped, the others are still processed.
Segmentation follows the paper's protocol (:func:`offseg_hf.inference.segment.segment_image`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from offseg_hf.inference.image_io import IMAGE_SUFFIXES, ImageLoadError, load_image

if TYPE_CHECKING:  # pragma: no cover
    from offseg_hf.inference.segment import SegmentationProtocol

__all__ = [
    "ImagePrediction",
    "ModelLoadError",
    "PredictionSettings",
    "PredictionSummary",
    "collect_images",
    "label_map_from_png",
    "load_model",
    "output_paths",
    "overlay_title",
    "predict_files",
    "predict_image",
    "prediction_settings",
]

# A Hub repository id ``user/name``: only such names (and existing folders) are ever looked up on the Hub.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(OSError):
    """The model (or its image processor) cannot be loaded; the message says what was looked for."""


def load_model(path: str, device: str = "auto", fold_batch_norm: bool = True, compile: bool = False):
    """Load a semantic-segmentation model folder (or Hub id) and its image processor for inference.

    Args:
        path: a folder written by ``save_pretrained`` (``config.json`` + weights, optionally
            ``preprocessor_config.json``), or a Hugging Face Hub id such as ``org/name``.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``…
        fold_batch_norm: fold EfficientFormerV2's BatchNorms into their convolutions
            (:func:`~offseg_hf.models.modeling_efficientformer_v2.fold_batch_norm`: same outputs, one pass less per norm);
            the model is then for inference only (its state dict no longer has the checkpoint's layout).
        compile: run the network through ``torch.compile`` (inductor; the first call of each input size compiles).

    Returns:
        ``(model, processor)``: the model in eval mode on ``device``; the folder's image processor, or a
        processor of :func:`~offseg_hf.inference.image_processing_offseg.build_image_processor` (ADE20K protocol) when it has
        none (:func:`offseg_hf.segment` only uses its normalisation and resize, with sizes of its own).

    A training checkpoint (a ``checkpoint-N`` folder, or one with a ``manifest.json``) is verified first
    (:func:`offseg_hf.training.checkpoints.checkpoint_problems`, the files loading reads).

    Raises:
        ModelLoadError: naming the folder and the files looked for, or the damaged file of a checkpoint.
    """
    import torch
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModelForSemanticSegmentation,
        AutoModelForUniversalSegmentation,
    )

    import offseg_hf.models  # noqa: F401  (registers the models with the Auto classes)
    from offseg_hf.inference.image_processing_offseg import build_image_processor  # (and registers old OffSeg processors)
    from offseg_hf.training.checkpoints import MANIFEST, checkpoint_problems

    folder = Path(path).expanduser()
    config_file = folder / "config.json"
    if folder.is_dir():
        if not config_file.is_file():
            raise ModelLoadError(f"{folder} is not a saved model folder: looked for {config_file}, which does not exist")
        if (folder / MANIFEST).is_file() or re.match(r"^checkpoint-\d+$", folder.name):  # a training checkpoint
            problems = checkpoint_problems(folder, model_only=True)
            if problems:
                raise ModelLoadError(f"checkpoint {folder} is damaged or incomplete: " + "; ".join(problems))
        source = str(folder)
    elif folder.exists():
        raise ModelLoadError(f"{folder} is a file; --model expects a model folder containing config.json")
    elif HUB_ID.match(str(path)) and not str(path).startswith("."):
        source = str(path)
    else:
        raise ModelLoadError(f"model folder not found: {folder.resolve()} (looked for {folder.resolve() / 'config.json'})")

    try:
        # transformers' plain Mask2Former is a universal-segmentation model; every other model type of ours is semantic
        config = AutoConfig.from_pretrained(source)
        auto_class = AutoModelForUniversalSegmentation if config.model_type == "mask2former" else AutoModelForSemanticSegmentation
        model = auto_class.from_pretrained(source, config=config)
    except (OSError, ValueError, KeyError) as error:
        where = (
            f"folder {folder} (config.json and model.safetensors / pytorch_model.bin)"
            if folder.is_dir()
            else f"{source}: not a local folder (looked for {config_file.resolve()}) nor loadable from the Hub"
        )
        raise ModelLoadError(f"cannot load a segmentation model from {where}: {error}") from error
    if folder.is_dir() and not (folder / "preprocessor_config.json").is_file():
        processor = build_image_processor(model_type=model.config.model_type)
    else:
        try:
            processor = AutoImageProcessor.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"cannot load the image processor of {source} (preprocessor_config.json): {error}") from error

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = model.to(device).eval()
    except (RuntimeError, AssertionError) as error:
        raise ModelLoadError(f"cannot move the model to device {device!r}: {error}") from error
    if fold_batch_norm:
        from offseg_hf.models.modeling_efficientformer_v2 import fold_batch_norm as fold

        fold(model)
    if compile:
        model.forward = torch.compile(model.forward)
    return model, processor


@dataclass(frozen=True)
class PredictionSettings:
    """What ``offseg predict`` (and ``offseg demo``) derive once per model.

    Attributes:
        id2label: ``{class index: name}`` of the model.
        palette: ``(K, 3)`` uint8 colours (:func:`~offseg_hf.inference.visualize.resolve_palette`).
        dataset: benchmark whose palette it is, ``None`` for the generated palette.
        protocol: the :class:`~offseg_hf.inference.segment.SegmentationProtocol` used.
        protocol_record: the protocol as JSON-ready values (with its name when given by name).
    """

    id2label: dict[int, str]
    palette: np.ndarray
    dataset: str | None
    protocol: "SegmentationProtocol"
    protocol_record: dict


def prediction_settings(model, protocol=None, scale: tuple[int, int] | None = None) -> PredictionSettings:
    """Palette and test protocol for ``model``.

    Args:
        protocol: dataset name or :class:`~offseg_hf.inference.segment.SegmentationProtocol`; default: the benchmark
            the model's classes come from, else ADE20K.
        scale: ``(long, short)`` replacing the protocol's keep-ratio resize.
    """
    from offseg_hf.inference.segment import get_protocol
    from offseg_hf.inference.visualize import resolve_palette

    id2label = {int(k): v for k, v in model.config.id2label.items()}
    palette, dataset = resolve_palette(id2label)
    if protocol is None:  # the benchmark's test protocol; ADE20K's for other class sets (synthetic included)
        from offseg_hf.inference.segment import PROTOCOLS

        protocol = dataset if dataset in PROTOCOLS else "ade20k"
    protocol_name = protocol if isinstance(protocol, str) else None
    protocol = get_protocol(protocol)
    if scale is not None:
        protocol = dataclasses.replace(protocol, scale=(int(scale[0]), int(scale[1])))
    protocol_record = {"name": protocol_name, **{k: list(v) for k, v in dataclasses.asdict(protocol).items()}}
    return PredictionSettings(id2label, palette, dataset, protocol, protocol_record)


@dataclass
class ImagePrediction:
    """One segmented image.

    Attributes:
        label_map: ``(H, W)`` class indices at the image size.
        fractions: :func:`~offseg_hf.inference.visualize.class_fractions` of the label map (largest first).
        seconds: time taken by the model (segmentation only, not drawing).
    """

    label_map: np.ndarray
    fractions: list[dict]
    seconds: float


def predict_image(image, model, processor, settings: PredictionSettings, *, mode: str = "whole", tta: bool = False) -> ImagePrediction:
    """Segment one RGB image (from :func:`~offseg_hf.inference.image_io.load_image`) with the paper's protocol, with
    bounded memory for large photos (:func:`~offseg_hf.inference.segment.segment_image`)."""
    from offseg_hf.inference.segment import segment_image
    from offseg_hf.inference.visualize import class_fractions

    start = time.perf_counter()
    result = segment_image(model, processor, image, mode=mode, tta=tta, protocol=settings.protocol)
    seconds = time.perf_counter() - start
    label_map = result.label_map.numpy()
    return ImagePrediction(label_map, class_fractions(label_map, settings.id2label), seconds)


def overlay_title(mode: str, tta: bool) -> str:
    """Heading of the prediction panel of an overlay."""
    return f"prediction ({mode}{', multi-scale + flip' if tta else ''})"


def collect_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Expand command-line inputs into image files.

    A file is taken as given (whatever its suffix; unreadable files fail later, by name). A directory
    contributes its files with an image suffix (:data:`~offseg_hf.inference.image_io.IMAGE_SUFFIXES`), sorted, not
    recursively. Duplicates are dropped.

    Returns:
        ``(files, missing)``: the files in order, and ``(path, reason)`` for inputs that do not exist or are
        empty directories.
    """
    files: list[Path] = []
    missing: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                missing.append((path, f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this directory"))
        elif path.is_file():
            found = [path]
        else:
            missing.append((path, "no such file or directory"))
            continue
        for file in found:
            key = file.resolve()
            if key not in seen:
                seen.add(key)
                files.append(file)
    return files, missing


def output_paths(out_dir: Path, image: Path, used: set[str]) -> dict[str, Path]:
    """Output files of one image, ``<stem>_labels.png``, ``<stem>_overlay.png``, ``<stem>.json``; a stem
    already used in this run gets ``-2``, ``-3``… appended."""
    stem = image.stem or "image"
    candidate, number = stem, 1
    while candidate in used:
        number += 1
        candidate = f"{stem}-{number}"
    used.add(candidate)
    return {
        "labels": out_dir / f"{candidate}_labels.png",
        "overlay": out_dir / f"{candidate}_overlay.png",
        "json": out_dir / f"{candidate}.json",
    }


@dataclass
class PredictionSummary:
    """Outcome of :func:`predict_files`.

    Attributes:
        written: per segmented image, its output paths (``labels``, ``overlay``, ``json``).
        failed: ``(input, reason)`` for every input that could not be read or segmented.
        seconds: wall time.
        pixel_counts: ``{class name: pixels}`` over all segmented images.
    """

    written: dict[Path, dict[str, Path]] = field(default_factory=dict)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0
    pixel_counts: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed

    def report(self) -> str:
        """Multi-line human summary: counts, time, top classes, failures."""
        total = len(self.written) + len(self.failed)
        lines = [f"segmented {len(self.written)} of {total} image(s) in {self.seconds:.1f} s"]
        if self.pixel_counts:
            all_pixels = sum(self.pixel_counts.values())
            top = sorted(self.pixel_counts.items(), key=lambda item: -item[1])[:5]
            lines.append("most frequent classes: " + ", ".join(f"{name} {100 * n / all_pixels:.1f}%" for name, n in top))
        if self.failed:
            lines.append(f"{len(self.failed)} failed:")
            lines.extend(f"  {path}: {reason}" for path, reason in self.failed)
        return "\n".join(lines)


def predict_files(
    inputs: Sequence[str | Path],
    model,
    processor,
    out_dir: str | Path,
    *,
    mode: str = "whole",
    tta: bool = False,
    protocol=None,
    scale: tuple[int, int] | None = None,
    model_name: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> PredictionSummary:
    """Segment image files and write their label maps, overlays and statistics.

    Args:
        inputs: image files and/or directories (see :func:`collect_images`).
        model, processor: as returned by :func:`load_model`; or any callable network with ``config.id2label``
            and its processor (:class:`offseg_hf.deploy.onnx_runtime.OnnxSegmenter` and
            ``OnnxSegmenter.image_processor()`` for an exported ONNX file), see
            :func:`offseg_hf.inference.segment.segment_image`.
        out_dir: output folder (created).
        mode, tta: see :func:`offseg_hf.inference.segment.segment_image`.
        protocol: dataset name or :class:`~offseg_hf.inference.segment.SegmentationProtocol`; default: the benchmark
            the model's classes come from, else ADE20K.
        scale: ``(long, short)`` replacing the protocol's keep-ratio resize (e.g. ``(1024, 256)`` for a fast
            CPU preview).
        model_name: recorded in each JSON file.
        progress: tqdm progress bar over the images.
        log: where per-image problems are reported as they happen (default: ``tqdm.write`` to stderr).

    Returns:
        A :class:`PredictionSummary`; per-image failures are collected there, never raised.
    """
    from tqdm.auto import tqdm

    from offseg_hf.training.checkpoints import StorageError, atomic_output, atomic_write_text
    from offseg_hf.inference.visualize import save_label_map, save_overlay

    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = prediction_settings(model, protocol, scale)
    if log is None:

        def log(message: str) -> None:
            tqdm.write(message, file=sys.stderr)

    files, missing = collect_images(inputs)
    summary = PredictionSummary(failed=list(missing))
    for path, reason in missing:
        log(f"skipped {path}: {reason}")
    used: set[str] = set()
    bar = tqdm(files, desc="offseg predict", unit="image", disable=not progress)
    for path in bar:
        bar.set_postfix_str(path.name[-30:], refresh=False)
        try:
            image = load_image(path)
            prediction = predict_image(image, model, processor, settings, mode=mode, tta=tta)
        except ImageLoadError as error:
            summary.failed.append((path, str(error).removeprefix(f"{path}: ")))
            log(f"skipped {path}: {summary.failed[-1][1]}")
            continue
        except (RuntimeError, ValueError, MemoryError) as error:
            summary.failed.append((path, f"{type(error).__name__}: {error}"))
            log(f"failed {path}: {summary.failed[-1][1]}")
            continue
        label_map, fractions = prediction.label_map, prediction.fractions
        paths = output_paths(out_dir, path, used)
        # every file is renamed into place once complete (a kill leaves no half-written PNG); a full disk stops
        # the run and removes this image's files already written, so that every image has all three or none
        try:
            with atomic_output(paths["labels"]) as temporary:
                save_label_map(label_map, settings.palette, temporary)
            with atomic_output(paths["overlay"]) as temporary:
                save_overlay(image, label_map, settings.palette, fractions, temporary, title=overlay_title(mode, tta))
            record = {
                "image": str(path),
                "width": image.width,
                "height": image.height,
                "model": model_name,
                "mode": mode,
                "tta": tta,
                "protocol": settings.protocol_record,
                "palette": settings.dataset or "generated",
                "label_map": paths["labels"].name,
                "overlay": paths["overlay"].name,
                "classes": fractions,
            }
            atomic_write_text(paths["json"], json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        except StorageError as error:
            for written in paths.values():
                written.unlink(missing_ok=True)
            raise StorageError(error.errno, f"{error}; stopped after {len(summary.written)} complete image(s) in "
                               f"{out_dir}") from error
        summary.written[path] = paths
        for entry in fractions:
            summary.pixel_counts[entry["label"]] = summary.pixel_counts.get(entry["label"], 0) + entry["pixels"]
    summary.seconds = time.perf_counter() - start
    return summary


def label_map_from_png(path: str | Path) -> np.ndarray:
    """Read back a label map written by ``offseg predict`` as ``(H, W)`` class indices."""
    from PIL import Image

    with Image.open(path) as image:
        return np.array(image)
