"""Baselines the paper compares against, built on the same P3 modules (QuaRot-style W4A8KV4)."""

from .quarot import quarot_quantize, rotate_model

__all__ = ["quarot_quantize", "rotate_model"]
