"""Normalization layers: one module per method, each with its forward and hand-derived VJP."""
