"""cscvision: map stemness-rich and immunosuppressive regions in whole-slide images.

Research use only; not for diagnosis.

The public API is importable from here and loaded on first use (PEP 562), so
``import cscvision`` stays light (no torch) until a model is touched::

    import cscvision
    with cscvision.open_slide("slide.svs") as slide:
        grid = cscvision.make_grid(slide, cscvision.GridSpec(mpp=0.5, tile_px=224))
    model = cscvision.load_model("models/demo-synthetic")
    pred = cscvision.predict_slide("slide.svs", model)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it
_API = {
    "open_slide": "cscvision.slides.slide",
    "Slide": "cscvision.slides.slide",
    "SlideError": "cscvision.slides.info",
    "CorruptTileError": "cscvision.slides.info",
    "SlideInfo": "cscvision.slides.info",
    "GridSpec": "cscvision.slides.grid",
    "TileGrid": "cscvision.slides.grid",
    "make_grid": "cscvision.slides.grid",
    "detect_tissue": "cscvision.slides.grid",
    "read_annotations": "cscvision.labels.annotations",
    "tile_targets": "cscvision.labels.targets",
    "ClassMap": "cscvision.labels.targets",
    "read_cohort": "cscvision.labels.cohort",
    "LabelTable": "cscvision.labels.table",
    "read_label_table": "cscvision.labels.table",
    "write_label_table": "cscvision.labels.table",
    "register_slides": "cscvision.labels.registration",
    "Registration": "cscvision.labels.registration",
    "ihc_labels": "cscvision.labels.ihc_labels",
    "marker_config": "cscvision.labels.ihc",
    "read_st": "cscvision.labels.st",
    "score_programmes": "cscvision.labels.programmes",
    "ProgrammeConfig": "cscvision.labels.programmes",
    "load_config": "cscvision.training.config",
    "train": "cscvision.training.train",
    "ModelCard": "cscvision.training.card",
    "read_card": "cscvision.training.card",
    "load_model": "cscvision.training.export",
    "export_model": "cscvision.training.export",
    "read_feature_store": "cscvision.features.store",
    "write_feature_store": "cscvision.features.store",
    "FeatureStore": "cscvision.features.store",
    "load_encoder": "cscvision.features.encoders",
    "predict_slide": "cscvision.inference.predict",
    "SlidePrediction": "cscvision.outputs.prediction",
    "write_slide_outputs": "cscvision.outputs.slide_folder",
    "read_outputs": "cscvision.outputs.read",
    "region_masks": "cscvision.outputs.regions",
    "colocalisation": "cscvision.outputs.statistics",
    "within_fraction": "cscvision.outputs.statistics",
    "SlideOutputs": "cscvision.outputs.read",
    "write_cohort": "cscvision.synth",
    "CellTable": "cscvision.cells.table",
    "read_cell_table": "cscvision.cells.table",
    "write_cell_table": "cscvision.cells.table",
    "read_cells": "cscvision.cells.readers",
    "cell_types": "cscvision.cells.types",
    "tile_cell_features": "cscvision.cells.tiles",
    "run_cells": "cscvision.outputs.cell_batch",
    "CellSettings": "cscvision.outputs.cell_batch",
    "ImmuneSettings": "cscvision.outputs.cell_immune",
    "compartments_from_cells": "cscvision.cells.compartments",
    "immune_report": "cscvision.cells.phenotype",
    "cell_label_table": "cscvision.cells.labels",
}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'cscvision' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
