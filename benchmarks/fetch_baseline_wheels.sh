#!/usr/bin/env bash
# Wheels of the optional GPU baselines for a GPU machine without network: transformers' QuantizedCache with the
# hqq backend (bench_decode_attention.py) and GemLite (bench_gemm.py --gemlite). All are pure Python.
# Run here, where PyPI is reachable; it fills .whl/ (in .gitignore). On the GPU machine, with .whl carried:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip wheel -q --no-deps -w .whl hqq==0.2.8.post1 einops==0.8.2 termcolor==3.3.0 gemlite==0.6.0.post2
ls -l .whl
