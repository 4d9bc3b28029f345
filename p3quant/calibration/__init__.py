"""Calibration run before weights are packed: AWQ with the config's 4-bit weight quantizer in the loop."""

from .awq import AWQSettings, apply_awq

__all__ = ["AWQSettings", "apply_awq"]
