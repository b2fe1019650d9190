"""Datasets, label tables, palettes and training transforms.

Import the submodules directly (``offseg_hf.data.tables``, ``offseg_hf.data.synthetic`` …): this
package module stays free of heavy imports.
"""
