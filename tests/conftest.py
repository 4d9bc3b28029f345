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


@pytest.fixture
def require_data():
    """Return a function mapping a path under the data folder to that file, skipping the test if it is absent."""
    from p3quant.data import data_dir

    def find(relative: str):
        path = data_dir() / relative
        if not path.is_file():
            pytest.skip(f"{path} not found: set P3QUANT_DATA to the folder holding the evaluation data (../shared/data)")
        return path

    return find
