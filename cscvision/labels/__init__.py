"""Labels: annotation readers (QuPath GeoJSON, ASAP XML, tile CSV, IHC DAB), soft tile
targets from regions, cohort manifests and patient-level splits.

New label sources (IHC registration, spatial transcriptomics, slide-level tables) live here
and hand training a tile-label table.
"""
