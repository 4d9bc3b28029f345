"""Evaluation of (quantized) models: perplexity with the standard protocol, through the prefill or decode path,
and layer-by-layer comparison of two copies of a model (e.g. two backends)."""

from .layer_diff import LayerDifference, layer_differences
from .perplexity import PerplexityResult, perplexity

__all__ = ["LayerDifference", "PerplexityResult", "layer_differences", "perplexity"]
