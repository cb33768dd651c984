"""Models: the exported model (card, export and load), every network that turns tiles into
numbers (tile backbones, foundation-model encoders, heads, fine-tuned encoder blocks,
attention MIL), one registry of those networks (:mod:`cscvision.models.registry`) and
one registry of model kinds behind one interface (:mod:`cscvision.models.kinds`).

Below ``features/`` (feature extraction runs a registered encoder), ``training/`` (each
Lightning system holds a network from here) and ``inference/``/``outputs/`` (which load
and run models through this stage only). Nothing here imports Lightning.
"""
