"""Synthetic H&E slides with known ground truth (``cscvision synth``).

No slides labelled for stemness or immunosuppression can be had offline; these stand in
for them in the demo, the training and accuracy tests, and the benchmarks.

Per slide, in one folder (``<id>`` is the slide id, e.g. ``SYN-P003-S01``):

- ``<id>.tiff``: tiled (256 px), JPEG-compressed (YCbCr 4:2:0), pyramidal TIFF that
  OpenSlide opens as ``generic-tiff``; 0.5 µm/px at level 0 by default, written as
  XResolution/YResolution in pixels per centimetre; levels /4 each, at least 3.
- ``<id>.geojson``: QuPath GeoJSON FeatureCollection, one classified annotation per
  connected polygon (level-0 pixels, holes as interior rings, closed rings). Classes:
  "Stemness-rich" and "Immunosuppressive" (the targets; they overlap in the niche),
  "Tumor" and "Necrosis" (other tissue, not targets), and the QC artefacts
  "Pen mark", "Fold", "Bubble", "Out of focus". Unlabelled tissue is stroma.
- ``<id>_labels.png``: 8-bit label mask, 8 µm/px by default (``<id>_truth.json`` says);
  a pixel is in a class when its centre is inside the class's polygons, and its value is
  the sum of the bits that apply: 1 tissue, 2 Tumor, 4 Necrosis, 8 Stemness-rich,
  16 Immunosuppressive, 32 Pen mark, 64 Fold, 128 Out of focus (bubbles: GeoJSON only).
  ``(mask & 8) > 0`` is the stemness mask; ``(mask & 24) == 24`` is the niche.
- ``<id>_thumb.png``: thumbnail (longest side ≤ 1024 px) with the annotations outlined.
- ``<id>_truth.json``: seed, size, areas and fractions of tissue per class and for the
  niche, the artefacts present, the label mask encoding, and the stain profile.

With ``ihc_markers`` (``cscvision synth --ihc``) each H&E slide gets paired IHC slides
``<id>_<marker>.tiff`` with ``<id>_<marker>_truth.json`` (the true transform), and the
cohort ``ihc_manifest.csv``: see :mod:`cscvision.synth.ihc`.

A cohort adds ``cohort.csv`` with columns ``slide_id,patient_id,slide_path,annotation_path``
(paths relative to the CSV's folder). A patient's slides share a stain lab batch.

Colour is not a shortcut: each slide draws its own stain vectors and strengths
(Beer–Lambert), and the classes differ in cell morphology and density, not hue.
"""

from cscvision.synth.layout import CLASS_COLORS, REGION_CLASSES, SlideLayout, make_layout
from cscvision.synth.render import SlideRenderer
from cscvision.synth.stain import StainProfile, sample_lab_profile, sample_slide_profile
from cscvision.synth.truth import LABEL_BITS
from cscvision.synth.writer import (
    COHORT_COLUMNS,
    SlideTruth,
    plan_cohort,
    write_cohort,
    write_slide,
)

__all__ = [
    "CLASS_COLORS",
    "COHORT_COLUMNS",
    "LABEL_BITS",
    "REGION_CLASSES",
    "SlideLayout",
    "SlideRenderer",
    "SlideTruth",
    "StainProfile",
    "make_layout",
    "plan_cohort",
    "sample_lab_profile",
    "sample_slide_profile",
    "write_cohort",
    "write_slide",
]
