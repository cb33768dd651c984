"""Writers of the per-slide inference outputs; :mod:`cscvision.outputs` calls them in order."""
