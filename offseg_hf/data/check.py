"""The dataset check: every sample's files before training or evaluation, one report naming each bad file.

:func:`check_dataset` looks at each sample of a canonical dataset (see :mod:`offseg_hf.data.loading`):

* ``fast`` (run automatically at the start of ``offseg train`` / ``offseg evaluate``): for datasets of
  files, that the image and its label map exist, that their headers can be read, that the label map is a
  single-channel image of the image's size; other datasets (synthetic, Hub streams) read their first rows;
* ``full`` (``offseg check-data``, and ``--skip-bad-samples``): reads every sample completely through the
  dataset's own reading code, which also checks the label values against the dataset's encoding (a value
  200 in ADE20K's 0..150 is named with its file).

A :class:`DataCheckReport` lists the problems; :func:`ensure_clean` raises :class:`DataCheckError` (one
message listing every bad file) or, with ``skip_bad_samples``, returns the dataset without the bad samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["DataCheckError", "DataCheckReport", "SampleProblem", "check_dataset", "ensure_clean"]

_LABEL_MODES = ("L", "P", "I", "I;16")
_PREVIEW_ROWS = 2  # rows read by the fast check of datasets that are not files


@dataclass(frozen=True)
class SampleProblem:
    """One bad sample: its row, its files and what is wrong."""

    index: int
    files: tuple[str, ...]
    problem: str

    def __str__(self) -> str:
        if self.files and not any(name in self.problem for name in self.files):
            return f"{self.files[0]}: {self.problem}"
        return self.problem


@dataclass
class DataCheckReport:
    """Outcome of :func:`check_dataset`."""

    name: str
    num_samples: int | None
    checked: int = 0
    mode: str = "fast"
    problems: list[SampleProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self, limit: int = 50) -> str:
        total = "?" if self.num_samples is None else self.num_samples
        if self.ok:
            return f"{self.name}: {self.checked} of {total} samples checked ({self.mode}), no problems"
        lines = [f"{self.name}: {len(self.problems)} of {self.checked} samples checked ({self.mode}) have problems:"]
        lines += [f"  {problem}" for problem in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  … and {len(self.problems) - limit} more")
        return "\n".join(lines)


class DataCheckError(ValueError):
    """A dataset with bad samples; the message lists them and how to continue."""

    def __init__(self, report: DataCheckReport):
        self.report = report
        super().__init__(report.format() + "\nfix or remove these files, or pass --skip-bad-samples to use the rest")


def _message(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    if isinstance(error, OSError) and not isinstance(error, FileNotFoundError) and error.filename:
        text = f"{error.filename}: cannot read ({error.strerror or text})"
    return text


def _file_columns(dataset):
    """The ``(image_path, label_path)`` columns of a dataset of files, without running its reader; else ``None``."""
    import datasets

    if not isinstance(dataset, datasets.Dataset) or "image_path" not in dataset.column_names:
        return None
    raw = dataset.with_format(None)
    return raw["image_path"], raw["label_path"]


def _check_headers(image_path: str, label_path: str) -> str | None:
    from PIL import Image, UnidentifiedImageError

    if not Path(image_path).is_file():
        return f"{image_path}: image not found"
    if not Path(label_path).is_file():
        return f"{image_path} has no annotation {label_path}"
    sizes = []
    for path, kind in ((image_path, "image"), (label_path, "label map")):
        try:
            with Image.open(path) as image:
                if kind == "label map" and image.mode not in _LABEL_MODES:
                    return f"{path}: label maps must be single-channel images, got mode {image.mode!r}"
                sizes.append(image.size)
        except (UnidentifiedImageError, OSError) as error:
            return f"{path}: not a readable {kind} ({type(error).__name__}: {error})"
    if sizes[0] != sizes[1]:
        (iw, ih), (lw, lh) = sizes
        return f"{label_path}: label map is {lw}×{lh} but its image {image_path} is {iw}×{ih}"
    return None


def check_dataset(dataset, name: str = "dataset", *, full: bool = False, progress: bool = False) -> DataCheckReport:
    """Check every sample of ``dataset`` (see the module docstring for ``full`` vs fast).

    Returns:
        a :class:`DataCheckReport`; nothing is raised for bad samples.
    """
    import datasets

    size = len(dataset) if hasattr(dataset, "__len__") and not isinstance(dataset, datasets.IterableDataset) else None
    report = DataCheckReport(name, size, mode="full" if full else "fast")
    columns = _file_columns(dataset)
    iterator = range(size) if size is not None else None
    if progress and size:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"checking {name}", unit="sample")
    if columns is not None:
        images, labels = columns
        for index in iterator:
            files = (images[index], labels[index])
            problem = _check_headers(*files)
            if problem is None and full:
                try:
                    dataset[index]
                except Exception as error:  # noqa: BLE001 - every reading failure is a problem of this sample
                    problem = _message(error)
            if problem is not None:
                report.problems.append(SampleProblem(index, files, problem))
            report.checked += 1
        return report
    # generated or streamed rows: read them (all of them in full mode, the first few otherwise)
    limit = None if full else _PREVIEW_ROWS
    if size is not None:
        for index in range(size if limit is None else min(size, limit)):
            try:
                dataset[index]
            except Exception as error:  # noqa: BLE001
                report.problems.append(SampleProblem(index, (), f"sample {index}: {_message(error)}"))
            report.checked += 1
    else:
        try:
            for index, _ in enumerate(dataset):
                report.checked += 1
                if limit is not None and report.checked >= limit:
                    break
        except Exception as error:  # noqa: BLE001
            report.problems.append(SampleProblem(report.checked, (), f"sample {report.checked}: {_message(error)}"))
    return report


def ensure_clean(dataset, name: str, *, skip_bad_samples: bool = False, full: bool = False):
    """``dataset`` after the check: unchanged when clean; without its bad samples when ``skip_bad_samples``
    (a full check, so that bad label values are found too; the count is logged); else raises.

    Raises:
        DataCheckError: bad samples and not ``skip_bad_samples`` (or nothing left after skipping).
    """
    report = check_dataset(dataset, name, full=full or skip_bad_samples)
    if report.ok:
        logger.info("%s", report.format())
        return dataset
    if not skip_bad_samples:
        raise DataCheckError(report)
    bad = {problem.index for problem in report.problems}
    if report.num_samples is None:
        raise DataCheckError(report)  # streamed datasets cannot drop rows by index
    keep = [index for index in range(report.num_samples) if index not in bad]
    if not keep:
        raise DataCheckError(report)
    logger.warning("%s\n--skip-bad-samples: skipped %d of %d samples of %s, using %d",
                   report.format(limit=20), len(bad), report.num_samples, name, len(keep))
    return dataset.select(keep)
