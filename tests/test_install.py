"""A regular (non-editable) install ships p3quant.kernels, p3quant.pim_emulator and p3quant.nn, not `kernels`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_regular_install_maps_folders_under_the_library(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(REPO)],
                   check=True, capture_output=True)
    assert (target / "p3quant" / "kernels" / "gemm_w4.py").is_file()
    assert (target / "p3quant" / "pim_emulator" / "report.py").is_file()
    assert (target / "p3quant" / "eval" / "tasks" / "p3_piqa.yaml").is_file()
    assert not (target / "kernels").exists() and not (target / "pim_emulator").exists()
    probe = ("import importlib.util, p3quant, p3quant.kernels.gemm_w4, p3quant.pim_emulator.report, p3quant.nn; "
             "assert p3quant.__file__.startswith(%r); print('ok')" % str(target))
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         check=True, capture_output=True, text=True)
    assert out.stdout.strip().endswith("ok")
