"""The image processor class named by OffSeg folders that offseg-hf ≤ 0.1 saved (``"image_processor_type":
"OffSegImageProcessor"``), and by folders that hold a model config but no ``preprocessor_config.json``.

New folders name transformers' own ``SegformerImageProcessor``, configured per dataset by
:func:`offseg_hf.inference.image_processing_offseg.build_image_processor`. This class is that processor unchanged;
``offseg_hf.models`` registers it with ``AutoImageProcessor`` for :class:`OffSegConfig`, so the old folders load
without remote code once ``offseg_hf`` is imported.
"""

from __future__ import annotations

from typing import Any

from transformers import SegformerImageProcessor


class OffSegImageProcessor(SegformerImageProcessor):
    """Loads processors saved by offseg-hf ≤ 0.1 (``"image_processor_type": "OffSegImageProcessor"``).

    Exactly ``SegformerImageProcessor`` (the old class was a line-by-line copy of it); :meth:`to_dict` writes
    ``"SegformerImageProcessor"`` and drops the old ``auto_map``, so ``AutoImageProcessor.from_pretrained(old)
    .save_pretrained(old)`` migrates a folder (its ``image_processing_offseg.py`` can then be deleted).
    """

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["image_processor_type"] = SegformerImageProcessor.__name__
        output.pop("auto_map", None)  # the old folder's pointer to its copy of the class
        return output


__all__ = ["OffSegImageProcessor"]
