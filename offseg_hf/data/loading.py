"""One entry point for every dataset: :func:`load_segmentation_dataset` picks the loader from a dataset name.

Every loader returns a ``datasets`` dataset in the canonical form of :mod:`offseg_hf.data.files`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from offseg_hf.data.files import canonical_split
from offseg_hf.data.registry import get_dataset

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
        name: dataset name (aliases of :func:`offseg_hf.data.registry.get_dataset` accepted); its spec names the
            loader of the official local layout.
        split: ``train`` / ``validation`` (``val``) / ``test``.
        data_dir: root of the official local layout (see each loader's docstring).
        hub_id: a Hub dataset id streamed instead (see :mod:`offseg_hf.data.hub`); extra keyword
            arguments (``image_column``, ``label_column``, ``revision``, ``config_name``) go to it.
        kwargs: for ``synthetic``: ``num_labels``, ``num_samples``, ``image_size``, ``seed``.

    Returns:
        a canonical dataset (see the module docstring).
    """
    spec = get_dataset(name)
    load = spec.load_function()
    if spec.name == "synthetic":
        return load(canonical_split(split), **kwargs)
    if hub_id is not None:
        from offseg_hf.data.hub import load_hub_dataset

        return load_hub_dataset(hub_id, split=split, dataset=spec.name, **kwargs)
    if data_dir is None:
        raise ValueError(f"dataset {spec.name!r} needs --data-dir (official local layout) or --hub-id")
    return load(data_dir, split=split)
