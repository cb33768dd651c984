"""Training: config, tile datasets and their cache, augmentation, backbones, the Lightning
system, the training entry point, and the exported model folder (weights + model card).

:mod:`cscvision.training.card` (the model card) imports no torch, so writers can read it.
"""
