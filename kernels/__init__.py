"""Triton kernels of p3quant (installed as p3quant.kernels)."""
