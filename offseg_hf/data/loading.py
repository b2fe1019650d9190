"""One entry point for every dataset: :func:`load_segmentation_dataset` picks the loader from a dataset name.

Every loader returns a ``datasets`` dataset in the canonical form of :mod:`offseg_hf.data.files`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from offseg_hf.data.files import canonical_split

__all__ = ["load_segmentation_dataset"]


def load_segmentation_dataset(
    name: str,
    split: str = "train",
    data_dir: str | Path | None = None,
    hub_id: str | None = None,
    **kwargs: Any,
):
    """Load a split of ``synthetic``, ``ade20k``, ``coco-stuff``, ``cityscapes`` or ``pascal-context``.

    Args:
        name: dataset name (aliases of :func:`offseg_hf.data.tables.get_dataset_info` accepted).
        split: ``train`` / ``validation`` (``val``) / ``test``.
        data_dir: root of the official local layout (see each loader's docstring).
        hub_id: a Hub dataset id streamed instead (see :mod:`offseg_hf.data.hub`); extra keyword
            arguments (``image_column``, ``label_column``, ``revision``, ``config_name``) go to it.
        kwargs: for ``synthetic``: ``num_labels``, ``num_samples``, ``image_size``, ``seed``.

    Returns:
        a canonical dataset (see the module docstring).
    """
    if name.lower() == "synthetic":
        from offseg_hf.data.synthetic import load_synthetic

        return load_synthetic(canonical_split(split), **kwargs)
    from offseg_hf.data.tables import get_dataset_info

    info = get_dataset_info(name)
    if hub_id is not None:
        from offseg_hf.data.hub import load_hub_dataset

        return load_hub_dataset(hub_id, split=split, dataset=info.name, **kwargs)
    if data_dir is None:
        raise ValueError(f"dataset {info.name!r} needs --data-dir (official local layout) or --hub-id")
    if info.name == "ade20k":
        from offseg_hf.data.ade20k import load_ade20k as loader
    elif info.name == "coco-stuff":
        from offseg_hf.data.coco_stuff import load_coco_stuff as loader
    elif info.name == "cityscapes":
        from offseg_hf.data.cityscapes import load_cityscapes as loader
    else:
        from offseg_hf.data.pascal_context import load_pascal_context as loader
    return loader(data_dir, split=split)
