"""Test helper: fresh tensors full of garbage, so that kernels' unwritten outputs (or reads of them) show."""

import torch


def poisoned_empty(monkeypatch) -> None:
    """Make every torch.empty/empty_like NaN (floats) or all-ones bits (ints) so unwritten outputs show."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1 if t.dtype.is_signed else 255)

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: empty(t.shape, dtype=kw.get("dtype", t.dtype), device=t.device))
