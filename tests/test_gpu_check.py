"""`make gpu-check` without a GPU: one line saying so, exit 0 (the GPU path is exercised on a
GPU machine; see benchmarks/gpu_check.py)."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this runs the whole report")
def test_gpu_check_without_gpu():
    from benchmarks.gpu_check import NO_GPU_LINE
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [NO_GPU_LINE]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU this runs the whole report")
def test_make_gpu_check_target_without_gpu():
    make = subprocess.run(["make", "-n", "gpu-check"], cwd=ROOT, capture_output=True, text=True)
    assert make.returncode == 0 and "benchmarks/gpu_check.py" in make.stdout, make.stdout + make.stderr
    # the real target with this interpreter as the venv's python (no venv creation here)
    proc = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", "gpu-check",
                           f"VPY={sys.executable}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if not ln.startswith(sys.executable)]
    assert lines == ["gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False); "
                     "nothing to check."], proc.stdout
