"""Architectures and checkpoints (`architectures`), pt2 archives read as weights only (`pt2`), the demo trainer (`train`) and the tiny test CNN (`tiny`)."""
