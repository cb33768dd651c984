"""Inference: scoring every tile of a slide, stitching the scores into maps, running a batch
of slides locally, in shards, or on Ray."""
