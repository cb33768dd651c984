"""Outputs: what a slide's prediction becomes on disk (tiles table, maps, overlays, ASAP
likelihood TIFFs, QuPath GeoJSON, summary statistics), and reading it back."""
