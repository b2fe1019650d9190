"""Running a model on images: the paper's test protocol and everything around a prediction.

* :mod:`~offseg_hf.inference.segment`: :func:`segment` / :func:`segment_image` (whole image, sliding windows,
  multi-scale + flip; the per-dataset protocols);
* :mod:`~offseg_hf.inference.image_processing_offseg`: the image processor saved with a model;
* :mod:`~offseg_hf.inference.predict`: loading a model folder or Hub id, ``offseg predict``'s files;
* :mod:`~offseg_hf.inference.image_io`, :mod:`~offseg_hf.inference.visualize`: reading photos, palettes, overlays;
* :mod:`~offseg_hf.inference.demo`: the Gradio web demo and its Space export.
"""
