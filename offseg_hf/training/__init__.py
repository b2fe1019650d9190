"""Training with the paper's recipe on Transformers' Trainer.

* :mod:`~offseg_hf.training.train`: configuration, recipes, model / data / Trainer assembly, ``train``;
* :mod:`~offseg_hf.training.checkpoints`: crash-safe checkpoint folders and atomic file writes.
"""
