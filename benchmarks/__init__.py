"""Benchmarks and ablations of a source checkout (not part of the installed ``offseg_hf`` package).

Run from the repository root:

* ``python -m benchmarks.compare_models``: parameters, MACs and CPU latency of OffSeg / SegNeXt next to SegFormer
  (:mod:`benchmarks.models`);
* ``python -m benchmarks.plug``: SegFormer-B0 with and without offset learning on the same data and budget;
* ``python -m benchmarks.training``: training throughput and memory of OffSeg-T.
"""
