"""Official checkpoints → Transformers folders: reading, key maps, the convert flow, model cards.

* :mod:`~offseg_hf.conversion.convert`: the flow (read safely, detect the kind, convert, write atomically,
  verify, push) behind ``offseg convert``;
* :mod:`~offseg_hf.conversion.keymaps`: OffSeg / EfficientFormerV2 official key names → Transformers names;
* :mod:`~offseg_hf.conversion.segformer`, :mod:`~offseg_hf.conversion.segnext`: the same for SegFormer + offset
  learning and SegNeXt / MSCAN;
* :mod:`~offseg_hf.conversion.model_cards`: Hub ``README.md`` cards, from ``templates/`` (package data).
"""
