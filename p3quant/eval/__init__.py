"""Evaluation of (quantized) models: perplexity with the standard protocol, through the prefill or decode path."""

from .perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
