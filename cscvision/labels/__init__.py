"""Labels: annotation readers (QuPath GeoJSON, ASAP XML, tile CSV, IHC DAB), soft tile
targets from regions, cohort manifests and patient-level splits.

Label sources hand training a tile-label table (``table``): IHC (``registration`` of the
IHC slide onto the H&E slide, ``ihc`` marker positivity, ``ihc_labels`` the two together);
spatial transcriptomics and slide-level tables land here too.
"""
