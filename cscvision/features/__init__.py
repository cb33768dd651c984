"""Features: tile embeddings from a registered encoder (:mod:`cscvision.models.registry`,
local weights) written into per-slide feature stores that heads and MIL models train on."""
