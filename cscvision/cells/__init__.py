"""Cells: one cell table per slide, readers of the field's detectors, per-tile cell features.

Every cell source (a detector's export, multiplex IF, ``cscvision synth``) writes the same
table (:mod:`cscvision.cells.table`); cell features, phenotypes and cell-derived labels
read only it. Cell types form a small hierarchy (:mod:`cscvision.cells.types`), so each
feature can be asked at any level.
"""
