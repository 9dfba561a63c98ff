"""scripts/gpu-check.sh on a machine without a GPU: one line, exit 2, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the script would run its checks")
def test_without_a_cuda_device_it_stops_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "gpu-check"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu-check.sh"), str(out)], env={**os.environ, "PY": sys.executable},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc
    assert proc.stdout == "" and proc.stderr.count("\n") == 1 and "no CUDA device visible" in proc.stderr, proc
    assert not out.exists()
