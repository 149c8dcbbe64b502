"""Flax NNX models with parameters annotated by logical axis names (see train/mesh.py)."""
