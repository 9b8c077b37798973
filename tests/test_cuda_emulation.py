"""Host emulation of the CUDA kernel perturb_from_kernel (no GPU needed).

The kernel (csrc/cuda/kernels_cuda.cu; master weights: param <- round(master + sigma * eps))
is one call, csrc/cuda/sweep.cuh's walk_bucket with the PerturbFrom body: the index walk
(16-byte vector path with one-element head and tail, or the Philox-call path; grid-stride
loops with int64 indices) and the per-element math, __host__ __device__ with the thread
index and grid stride as arguments. tests/cuda_emulation.cpp compiles it with the host
compiler and runs every thread of several grid sizes sequentially, on the path the launcher
picks (plan_vec), for ~270k geometries: fp32 / bf16 / fp16 params, sizes 1..5000 and a few of
1-3M elements, bucket offsets up to 2^40 + 3, every 16-byte misalignment of the param,
masters sharing it or not, sigma 0 and not. Every element must be written exactly once (the
body's writes are counted), nothing outside the bucket touched, vectors 16-byte aligned, and
each param equal bit for bit to round(master + sigma * z(tag, offset + i)), z from
elementwise.h's element_normal; the z values it prints are compared here with
fused_flat.noise (the spec) and the normal_noise op. This catches a skipped or doubled
element, noise taken from the wrong index, and any dependence on the grid size.
It does not execute the CUDA kernel itself (tests/test_cuda_gpu.py does, on a GPU).
"""
from __future__ import annotations

import re
import struct

import pytest
import torch

from fused_flat import noise
from fused_flat.backends import _native
from tests.helpers import run_host_program


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    return run_host_program("cuda_emulation.cpp", tmp_path_factory.mktemp("cuda_emulation"))


def test_perturb_from_walk_on_host(emulation):
    out = emulation.stdout
    m = re.search(r"cases=(\d+) vector_path=(\d+) failures=(\d+)", out)
    assert m, f"unexpected output:\n{out[-4000:]}\n{emulation.stderr[-2000:]}"
    cases, vec, fails = map(int, m.groups())
    assert fails == 0, f"{fails} of {cases} geometries fail:\n{out[-4000:]}"
    # both paths ran, on many geometries each
    assert cases > 250_000 and 10_000 < vec < cases - 10_000, out[-2000:]
    assert emulation.returncode == 0


def _oracle_z(out: str) -> tuple[tuple[int, int, int, int], dict[int, torch.Tensor]]:
    nm = re.search(r"noise seed=(\d+) bucket=(\d+) step=(\d+) tag=(\d+)", out)
    assert nm, out[-2000:]
    z = {}
    for off, vals in re.findall(r"^z@(\d+)=(\S+)$", out, re.M):
        z[int(off)] = torch.tensor([struct.unpack("<f", struct.pack("<I", int(v, 16)))[0]
                                    for v in vals.split(",")])
    assert len(z) == 2, out[-2000:]
    return tuple(map(int, nm.groups())), z


def test_oracle_noise_is_the_spec(emulation):
    """The oracle's z(tag, offset + i) is fused_flat.noise's (layout 3; libm vs polynomial
    transcendental functions: within 1e-5)."""
    (seed, bucket, step, tag), z = _oracle_z(emulation.stdout)
    for off, got in z.items():
        want = noise.normal_noise(seed, bucket, step, tag, off, len(got), "cpu")
        assert (got - want).abs().max().item() <= 1e-5, (off, got, want)


@pytest.mark.skipif(not _native.available(), reason="C++ extension not built")
def test_oracle_noise_is_the_normal_noise_op(emulation):
    """... and bit for bit the normal_noise op's (the CPU backend's noise)."""
    from fused_flat.backends import cpp as ops
    (seed, bucket, step, tag), z = _oracle_z(emulation.stdout)
    for off, got in z.items():
        assert torch.equal(ops.normal_noise(seed, bucket, step, tag, off, len(got)), got), off
