"""Slides: opening a slide file, the µm/px policy, the fast JPEG path, tissue, tile grids.

What flows out: :class:`~cscvision.slides.slide.Slide` readers and
:class:`~cscvision.slides.grid.TileGrid` (level-0 ``xy_l0`` of every tissue tile), plus the
batch runner that takes a list of slides through any per-slide job.
"""
