"""The greedy-token argmax (kernels/argmax.py) equals torch.argmax(dim=-1, keepdim=True): ties to the lowest index,
NaN as the maximum, chunk boundaries and strided rows."""

import pytest
import torch

from p3quant.kernels import argmax
from p3quant.kernels.argmax import argmax_tokens


@pytest.mark.parametrize("dtype,v", [(torch.bfloat16, 10000), (torch.float16, 4096), (torch.float32, 37)])
def test_argmax_tokens_equals_torch(dtype, v):
    x = torch.randn(5, v).to(dtype)
    x[1, [3, v // 2, v - 1]] = x[1].max() + 1  # a tie across chunks: the first wins
    x[2] = float("-inf")  # nothing but -inf: index 0
    x[3, v - 2] = float("nan")  # NaN beats everything, even +inf elsewhere
    x[3, 0] = float("inf")
    x[4, v - 1] = x[4].max() + 1  # the max in the last, ragged chunk
    want = x.argmax(dim=-1, keepdim=True)
    got = argmax_tokens(x)
    assert got.dtype == torch.int64 and torch.equal(got, want)


def test_argmax_tokens_reads_strided_rows(monkeypatch):
    monkeypatch.setattr(argmax, "BLOCK", 64)  # many chunks per row
    logits = torch.randn(3, 4, 1000)
    assert torch.equal(argmax_tokens(logits[:, -1]), logits[:, -1].argmax(dim=-1, keepdim=True))


def test_argmax_tokens_rejects_bad_input():
    with pytest.raises(ValueError, match="floating"):
        argmax_tokens(torch.randint(0, 9, (2, 5)))
    with pytest.raises(ValueError, match="vocabulary"):
        argmax_tokens(torch.randn(2, 0))
