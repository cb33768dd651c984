"""Features: tile encoders (foundation models and CNNs from local weights) and per-slide
feature stores that heads and MIL models train on."""
