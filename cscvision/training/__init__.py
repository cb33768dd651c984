"""Training: config, tile datasets and their cache, augmentation, the Lightning systems (each
holding a network from :mod:`cscvision.models`), the training entry point (``train``, which
hands a config to its model kind's trainer) and the card a run exports.

The model itself (card, export and load, networks, kinds) is :mod:`cscvision.models`;
inference never imports this package.
"""
