"""The floor every stage stands on: atomic file writing, array geometry, the target palette.

Nothing here imports another cscvision module or a heavy library (no torch).
"""
