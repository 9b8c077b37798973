"""Host emulation of the multi-tensor SAM CUDA kernels (no GPU needed).

csrc/cuda/sam_multi.cuh holds the kernels' index logic (a block's row -> tensor slot and
pointers, from the by-value launch arguments of csrc/cuda/list_launch.h that the emulation
plans as the op does; 16-byte vector path with scalar tail, or scalar path when a pointer
is misaligned) and their per-element bodies as __host__ __device__ code.
tests/sam_multi_emulation.cpp compiles it with the host compiler and runs every block and
every thread (256, 32 and 7 threads per block) sequentially over 1600 random tensor lists
(fp32, bf16, fp16, fp64; empty and 1-element tensors; random misalignments; bucket offsets
up to 2^33 + 8): coverage (each element exactly once, nothing outside the views touched),
restore+step with momentum, the RW-SAM probe, and the ASAM squared norm, against
per-element oracles. The probe signs it prints are compared here with the Python
layout-3 oracle (tests/noise_v3_oracle.py).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from torch.utils import cpp_extension

from tests.noise_v3_oracle import rademacher_v3_oracle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sam_multi_index_logic_on_host(tmp_path):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.fail("no host C++ compiler (c++/g++) on PATH")
    exe = str(tmp_path / "sam_multi_emulation")
    cmd = [cxx, "-std=c++20", "-O1", "-ffp-contract=off",
           "-I" + os.path.join(ROOT, "csrc", "include"), "-I" + os.path.join(ROOT, "csrc", "cuda")]
    cmd += ["-I" + p for p in cpp_extension.include_paths()]
    cmd += ["-o", exe, os.path.join(ROOT, "tests", "sam_multi_emulation.cpp")]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, f"compile failed:\n{build.stderr[-4000:]}"
    run = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    m = re.search(r"cases=(\d+) vector_blocks=(\d+) failures=(\d+)", run.stdout)
    assert m, f"unexpected output:\n{run.stdout[-4000:]}\n{run.stderr[-2000:]}"
    cases, vec, fails = map(int, m.groups())
    assert fails == 0, f"{fails} failures:\n{run.stdout[-4000:]}"
    assert cases == 1600 and vec > 100, run.stdout
    assert run.returncode == 0
    for name, first in (("probe0", 0), ("probe33", (1 << 33) - 3)):
        got = re.search(name + r"=([+-]{64})", run.stdout).group(1)
        v = rademacher_v3_oracle(0x1234_5678_9ABC, 3, 17, first, 64)
        assert got == "".join("-" if x < 0 else "+" for x in v.tolist()), name
