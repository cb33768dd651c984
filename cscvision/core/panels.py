"""The default gene panels (human gene symbols): one definition for the spatial-transcriptomics
label builder (:mod:`cscvision.labels.programmes`, where each gene's citation is) and the
synthetic Visium writer (:mod:`cscvision.synth.visium`)."""

from __future__ import annotations

DEFAULT_PANELS: dict[str, tuple[str, ...]] = {
    "stemness": ("CD44", "PROM1", "ALDH1A1", "SOX2", "NANOG", "POU5F1", "KLF4"),
    "immunosuppressive": (
        "FOXP3",
        "IL10",
        "TGFB1",
        "CTLA4",
        "CD163",
        "MRC1",
        "ARG1",
        "IDO1",
        "CD274",
    ),
}
