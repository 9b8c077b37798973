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

import re

from tests.helpers import run_host_program
from tests.noise_v3_oracle import rademacher_v3_oracle


def test_sam_multi_index_logic_on_host(tmp_path):
    run = run_host_program("sam_multi_emulation.cpp", tmp_path)
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
