"""Host emulation of the multi-tensor Langevin CUDA kernels (no GPU needed).

csrc/cuda/multi_langevin.cuh holds the kernels' index logic (call-frame rows, the 16-byte
unit path with its call-path head and tail, the call path for misaligned streams) and their
per-element bodies as __host__ __device__ code. tests/multi_langevin_emulation.cpp compiles
it with the host compiler and runs every block and every thread (256, 32 and 7 threads per
block) sequentially over 1200 random tensor lists (fp32, bf16, fp16, fp64; empty and
1-element tensors; odd bucket offsets up to 2^33 + 8; random misalignments): perturb
(coverage, guard zones untouched), restore + step with momentum and both noises, SGLD
without momentum, and the all_finite body, bit for bit against per-element oracles from
elementwise.h. The eps values it prints are compared here with fused_flat.noise (layout v2).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import torch
from torch.utils import cpp_extension

from fused_flat import noise

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_multi_langevin_index_logic_on_host(tmp_path):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.fail("no host C++ compiler (c++/g++) on PATH")
    exe = str(tmp_path / "multi_langevin_emulation")
    cmd = [cxx, "-std=c++20", "-O1", "-ffp-contract=off",
           "-I" + os.path.join(ROOT, "csrc", "include"), "-I" + os.path.join(ROOT, "csrc", "cuda")]
    cmd += ["-I" + p for p in cpp_extension.include_paths()]
    cmd += ["-o", exe, os.path.join(ROOT, "tests", "multi_langevin_emulation.cpp")]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, f"compile failed:\n{build.stderr[-4000:]}"
    run = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    m = re.search(r"cases=(\d+) unit_blocks=(\d+) failures=(\d+)", run.stdout)
    assert m, f"unexpected output:\n{run.stdout[-4000:]}\n{run.stderr[-2000:]}"
    cases, units, fails = map(int, m.groups())
    assert fails == 0, f"{fails} failures:\n{run.stdout[-4000:]}"
    assert cases == 1200 and units > 1000, run.stdout
    assert run.returncode == 0
    for first in (5, (1 << 33) + 3):
        got = re.search(rf"eps@{first}=(\S+)", run.stdout).group(1)
        got = torch.tensor([float(x) for x in got.split(",")])
        want = noise.normal_noise(0x2545F4914F6CDD1D, 3, 11, 0, first, 8, "cpu")
        assert (got - want).abs().max().item() <= 1e-5, (first, got, want)
