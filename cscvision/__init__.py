"""cscvision: map stemness-rich and immunosuppressive regions in whole-slide images.

Research use only; not for diagnosis.

The public API is importable from here and loaded on first use (PEP 562), so
``import cscvision`` stays light (no torch) until a model is touched::

    import cscvision
    with cscvision.open_slide("slide.svs") as slide:
        grid = cscvision.make_grid(slide, cscvision.GridSpec(mpp=0.5, tile_px=224))
    model = cscvision.load_model("models/demo-synthetic")  # model.kind: its ModelKind
    with cscvision.open_slide("slide.svs") as slide:  # opened and tiled once
        pred = cscvision.predict_slide(slide, model, cscvision.InferSettings(device="cpu"))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # the same names, for type checkers and IDEs; never run
    from cscvision.cells.compartments import compartments_from_cells
    from cscvision.cells.labels import cell_label_table
    from cscvision.cells.mif import mif_cell_table
    from cscvision.cells.mif_panel import read_panel
    from cscvision.cells.mif_read import open_mif
    from cscvision.cells.phenotype import immune_report
    from cscvision.cells.readers import read_cells
    from cscvision.cells.table import CellTable, read_cell_table, write_cell_table
    from cscvision.cells.tiles import tile_cell_features
    from cscvision.cells.types import cell_types
    from cscvision.features.store import FeatureStore, read_feature_store, write_feature_store
    from cscvision.inference.predict import predict_slide
    from cscvision.inference.settings import InferSettings
    from cscvision.labels.annotations import read_annotations
    from cscvision.labels.cohort import read_cohort
    from cscvision.labels.ihc import marker_config
    from cscvision.labels.ihc_labels import ihc_labels
    from cscvision.labels.programmes import ProgrammeConfig, score_programmes
    from cscvision.labels.registration import Registration, register_slides
    from cscvision.labels.st import read_st
    from cscvision.labels.table import LabelTable, read_label_table, write_label_table
    from cscvision.labels.targets import ClassMap, tile_targets
    from cscvision.models.card import ModelCard, read_card
    from cscvision.models.encoders import load_encoder
    from cscvision.models.ensemble import LoadedEnsemble, load_models
    from cscvision.models.export import LoadedModel, export_model, load_model
    from cscvision.models.kinds import ModelKind, get_kind, register_kind
    from cscvision.outputs.anndata import outputs_anndata
    from cscvision.outputs.cell_batch import CellSettings, run_cells
    from cscvision.outputs.cell_immune import ImmuneSettings
    from cscvision.outputs.prediction import SlidePrediction
    from cscvision.outputs.read import SlideOutputs, read_outputs
    from cscvision.outputs.regions import region_masks
    from cscvision.outputs.slide_folder import write_slide_outputs
    from cscvision.outputs.spatialdata import outputs_spatialdata
    from cscvision.outputs.statistics import colocalisation, within_fraction
    from cscvision.slides.grid import GridSpec, TileGrid, detect_tissue, make_grid
    from cscvision.slides.info import CorruptTileError, SlideError, SlideInfo
    from cscvision.slides.slide import Slide, open_slide
    from cscvision.slides.stain import StainReference, fit_stain, normalise_batch
    from cscvision.synth import write_cohort
    from cscvision.training.config import load_config
    from cscvision.training.train import train

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
    "ModelCard": "cscvision.models.card",
    "read_card": "cscvision.models.card",
    "load_model": "cscvision.models.export",
    "load_models": "cscvision.models.ensemble",
    "LoadedEnsemble": "cscvision.models.ensemble",
    "export_model": "cscvision.models.export",
    "read_feature_store": "cscvision.features.store",
    "write_feature_store": "cscvision.features.store",
    "FeatureStore": "cscvision.features.store",
    "load_encoder": "cscvision.models.encoders",
    "predict_slide": "cscvision.inference.predict",
    "InferSettings": "cscvision.inference.settings",
    "SlidePrediction": "cscvision.outputs.prediction",
    "write_slide_outputs": "cscvision.outputs.slide_folder",
    "read_outputs": "cscvision.outputs.read",
    "outputs_anndata": "cscvision.outputs.anndata",
    "outputs_spatialdata": "cscvision.outputs.spatialdata",
    "region_masks": "cscvision.outputs.regions",
    "colocalisation": "cscvision.outputs.statistics",
    "within_fraction": "cscvision.outputs.statistics",
    "SlideOutputs": "cscvision.outputs.read",
    "write_cohort": "cscvision.synth",
    "LoadedModel": "cscvision.models.export",
    "ModelKind": "cscvision.models.kinds",
    "get_kind": "cscvision.models.kinds",
    "register_kind": "cscvision.models.kinds",
    "fit_stain": "cscvision.slides.stain",
    "normalise_batch": "cscvision.slides.stain",
    "StainReference": "cscvision.slides.stain",
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
    "open_mif": "cscvision.cells.mif_read",
    "read_panel": "cscvision.cells.mif_panel",
    "mif_cell_table": "cscvision.cells.mif",
}

__all__ = [
    "CellSettings",
    "CellTable",
    "ClassMap",
    "CorruptTileError",
    "FeatureStore",
    "GridSpec",
    "ImmuneSettings",
    "InferSettings",
    "LabelTable",
    "LoadedEnsemble",
    "LoadedModel",
    "ModelCard",
    "ModelKind",
    "ProgrammeConfig",
    "Registration",
    "Slide",
    "SlideError",
    "SlideInfo",
    "SlideOutputs",
    "SlidePrediction",
    "StainReference",
    "TileGrid",
    "__version__",
    "cell_label_table",
    "cell_types",
    "colocalisation",
    "compartments_from_cells",
    "detect_tissue",
    "export_model",
    "fit_stain",
    "get_kind",
    "ihc_labels",
    "immune_report",
    "load_config",
    "load_encoder",
    "load_model",
    "load_models",
    "make_grid",
    "marker_config",
    "mif_cell_table",
    "normalise_batch",
    "open_mif",
    "open_slide",
    "outputs_anndata",
    "outputs_spatialdata",
    "predict_slide",
    "read_annotations",
    "read_card",
    "read_cell_table",
    "read_cells",
    "read_cohort",
    "read_feature_store",
    "read_label_table",
    "read_outputs",
    "read_panel",
    "read_st",
    "region_masks",
    "register_kind",
    "register_slides",
    "run_cells",
    "score_programmes",
    "tile_cell_features",
    "tile_targets",
    "train",
    "within_fraction",
    "write_cell_table",
    "write_cohort",
    "write_feature_store",
    "write_label_table",
    "write_slide_outputs",
]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'cscvision' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
