"""Scoring a model on a dataset split: mIoU / mAcc / aAcc as mmsegmentation computes them.

* :mod:`~offseg_hf.evaluation.metrics`: the streaming confusion-matrix metric (also the Trainer's);
* :mod:`~offseg_hf.evaluation.evaluate`: a model over a split with the paper's protocol, and the report files;
* :mod:`~offseg_hf.evaluation.mean_iou`: the same metric as an ``evaluate`` module.
"""
