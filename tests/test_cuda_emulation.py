"""Host emulation of the CUDA kernels' work distribution (no GPU needed).

csrc/cuda/sweep.cuh holds the index logic of the kernels (16-byte vector path with
scalar head/tail, Philox-pair path, grid-stride loops with int64 indices) as
__host__ __device__ code, with the thread index and grid stride as arguments.
tests/cuda_emulation.cpp compiles it with the host compiler and runs every thread of
several grid sizes sequentially, for ~37k geometries (sizes 1..1027, bucket offsets up to
2^33 + 1, all 16-byte misalignments, grad misaligned against param, fp32/bf16/fp16/fp64,
every momentum/noise variant). Each result must equal, bit for bit, a per-element oracle
built from element_noise(bucket index): this catches a missed or doubly processed element,
noise taken from the wrong index, and any dependence on the grid size.
It does not execute the CUDA kernels themselves (tests/test_cuda_gpu.py does, on a GPU).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernel_index_logic_on_host(tmp_path):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.fail("no host C++ compiler (c++/g++) on PATH")
    exe = str(tmp_path / "cuda_emulation")
    cmd = [cxx, "-std=c++20", "-O1", "-ffp-contract=off",
           "-I" + os.path.join(ROOT, "csrc", "include"), "-I" + os.path.join(ROOT, "csrc", "cuda")]
    cmd += ["-I" + p for p in cpp_extension.include_paths()]
    cmd += ["-o", exe, os.path.join(ROOT, "tests", "cuda_emulation.cpp")]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, f"compile failed:\n{build.stderr[-4000:]}"
    run = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    m = re.search(r"cases=(\d+) vector_path=(\d+) failures=(\d+)", run.stdout)
    assert m, f"unexpected output:\n{run.stdout[-4000:]}\n{run.stderr[-2000:]}"
    cases, vec, fails = map(int, m.groups())
    assert fails == 0, f"{fails} of {cases} geometries differ from the oracle:\n{run.stdout[-4000:]}"
    assert cases > 30000 and 0 < vec < cases, run.stdout
    assert run.returncode == 0
