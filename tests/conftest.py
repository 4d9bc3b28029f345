"""Test setup: Triton runs in its CPU interpreter unless a GPU run asks otherwise; fresh seeds per test."""

import os
import secrets

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_seed() -> int:
    """A fresh seed per test, printed so that a failure can be reproduced with P3_TEST_SEED=<seed>."""
    seed = int(os.environ.get("P3_TEST_SEED") or secrets.randbits(32))
    torch.manual_seed(seed)
    print(f"P3_TEST_SEED={seed}")
    return seed
