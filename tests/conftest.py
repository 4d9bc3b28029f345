"""Test setup: Triton runs in its CPU interpreter unless a GPU run asks otherwise."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
