"""Benchmarks streamed from the Hugging Face Hub (parquet datasets, ``streaming=True``).

Script-based Hub datasets (such as the original ``scene_parse_150``) no longer load with
``datasets`` 5; parquet repositories do. Known repositories (defaults filled in automatically):

=================================  =========  ==============  ===================  ===================
Hub id                             dataset    revision        columns              labels
=================================  =========  ==============  ===================  ===================
``zhoubolei/scene_parse_150``      ade20k     ``refs/convert/ image / annotation   0..150, 0 = other
                                              parquet``                            (reduced here)
``GATE-engine/COCOStuff164K``      coco-stuff main            image / mask         raw ids 0..181
                                                                                   (mapped here)
=================================  =========  ==============  ===================  ===================

(``scene_parse_150`` uses config ``scene_parsing`` and splits ``train``/``validation``;
``COCOStuff164K`` has splits ``train``/``val``.) Any other repository works when you name its
columns (``image_column``, ``label_column``) and the label encoding (``label_format``, default
the benchmark's raw encoding: ADE20K / Pascal Context ``reduce``, COCO-Stuff ``coco-stuff-raw``,
Cityscapes ``cityscapes-label-ids``; use ``train-ids`` for maps already in train ids).

The Hub's parquet export (revision ``refs/convert/parquet``) stores one folder per config,
``<config>/<split>/0000.parquet`` …, and no dataset card, so ``datasets`` sees no named configs there:
on that revision the config is read as its folder (``data_dir``), elsewhere as a config name. A dataset
id or revision the Hub does not have is reported in one message naming both (tested against the Hub
stand-in of ``tests/hub_stand_in.py``, over the Hub's own HTTP endpoints).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from offseg_hf.data.files import LabelMapping, canonical_split, label_mapping_for
from offseg_hf.data.registry import DATASETS, get_dataset

__all__ = ["KNOWN_HUB_DATASETS", "PARQUET_EXPORT_REVISION", "load_hub_dataset"]

PARQUET_EXPORT_REVISION = "refs/convert/parquet"
"""The branch where the Hub's dataset viewer publishes a parquet copy of a dataset (one folder per config)."""

# hub id -> its benchmark, columns, revision and split names (from each dataset's spec)
KNOWN_HUB_DATASETS: dict[str, dict[str, Any]] = {
    hub_id: {"dataset": spec.name, **settings} for spec in DATASETS.values() for hub_id, settings in spec.hub_datasets.items()
}


def canonicalize_row(row: dict, index: int, image_column: str, label_column: str, mapping: LabelMapping, source: str):
    """One Hub row → ``{"image": RGB PIL, "label": "L" PIL of train ids, "index"}``.

    Raises:
        KeyError: a missing column (the message lists those present).
    """
    from PIL import Image

    for column in (image_column, label_column):
        if column not in row:
            raise KeyError(f"{source}: no column {column!r}; columns are {sorted(row)} (set image/label column names)")
    image = row[image_column]
    if not hasattr(image, "convert"):
        image = Image.fromarray(np.asarray(image))
    label = row[label_column]
    raw = np.asarray(label)
    if raw.ndim == 3:  # RGB-saved single-channel maps: all channels equal
        raw = raw[..., 0]
    train_ids = mapping(raw, source=f"{source} row {index} column {label_column!r}")
    return {"image": image.convert("RGB"), "label": Image.fromarray(train_ids, mode="L"), "index": index}


def load_hub_dataset(
    hub_id: str,
    split: str = "train",
    dataset: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    label_format: str | None = None,
    revision: str | None = None,
    config_name: str | None = None,
    streaming: bool = True,
):
    """Stream a split of a Hub segmentation dataset in the canonical row form.

    Args:
        hub_id: repository id (see the table above for the known ones and their defaults).
        split: ``train`` / ``validation`` / ``test`` (mapped to the repository's split names).
        dataset: benchmark name giving the number of classes and the default ``label_format``.
        image_column, label_column, label_format, revision, config_name: override the defaults.
        streaming: ``True`` (default) streams parquet shards; ``False`` downloads them.

    Returns:
        ``datasets.IterableDataset`` (``streaming=True``) or ``datasets.Dataset`` of canonical rows.

    Raises:
        FileNotFoundError: the Hub (``HF_ENDPOINT``) has no dataset ``hub_id`` or no such ``revision`` (or
            refuses access to it); the message names both.
    """
    import datasets

    known = KNOWN_HUB_DATASETS.get(hub_id, {})
    name = dataset or known.get("dataset")
    if name is None:
        raise ValueError(f"Hub dataset {hub_id!r} is not a known one: say which benchmark it is (dataset=...)")
    spec = get_dataset(name)
    info = spec.info
    image_column = image_column or known.get("image_column", "image")
    label_column = label_column or known.get("label_column", "label")
    label_format = label_format or known.get("label_format") or spec.label_format
    revision = revision if revision is not None else known.get("revision")
    config_name = config_name if config_name is not None else known.get("config_name")
    split = canonical_split(split)
    hub_split = known.get("splits", {}).get(split, split)
    mapping = label_mapping_for(label_format, info.num_labels)

    # the parquet export has no dataset card, hence no named configs: its configs are folders
    config = {"data_dir" if revision == PARQUET_EXPORT_REVISION else "name": config_name}
    try:
        raw = datasets.load_dataset(hub_id, split=hub_split, revision=revision, streaming=streaming, **config)
    except datasets.exceptions.DatasetNotFoundError as error:
        raise FileNotFoundError(
            f"cannot load Hub dataset {hub_id!r} at revision {revision or 'main'!r} from "
            f"{datasets.config.HF_ENDPOINT}: {error} Check the dataset id and the revision."
        ) from error
    columns = list(raw.column_names or [])

    def convert(row: dict, index: int) -> dict:
        return canonicalize_row(row, index, image_column, label_column, mapping, hub_id)

    if streaming:
        return raw.map(convert, with_indices=True, remove_columns=columns or None)
    raw = raw.add_column("index", list(range(len(raw))))
    return raw.with_transform(lambda batch: _convert_batch(batch, image_column, label_column, mapping, hub_id))


def _convert_batch(batch: dict, image_column: str, label_column: str, mapping: LabelMapping, source: str) -> dict:
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    out = [canonicalize_row(row, row["index"], image_column, label_column, mapping, source) for row in rows]
    return {key: [row[key] for row in out] for key in ("image", "label", "index")}
