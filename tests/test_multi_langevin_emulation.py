"""Host emulation of the multi-tensor Langevin CUDA kernels (no GPU needed).

csrc/cuda/multi_langevin.cuh holds the kernels' index logic (call-frame rows of the by-value
launches of csrc/cuda/list_launch.h, planned here as the op plans them; the 16-byte unit
path with its call-path head and tail, the call path for misaligned streams) and their
per-element bodies as __host__ __device__ code. tests/multi_langevin_emulation.cpp compiles
it with the host compiler and runs every block and every thread (256, 32 and 7 threads per
block) sequentially over 1200 random tensor lists (fp32, bf16, fp16, fp64; empty and
1-element tensors; odd bucket offsets up to 2^33 + 8; random misalignments): perturb
(coverage, guard zones untouched), restore + step with momentum and both noises, SGLD
without momentum, the stochastic-rounding step (bf16/fp16, kSR: every noise combination,
restore tags 0..2, with and without momentum) and the all_finite body, bit for bit against
per-element oracles from elementwise.h; and the kernels' device-scalar loads (float64 /
float32 lr and noise_std, int64 step: the host path's values). The eps values it prints are
compared here with fused_flat.noise (layout 3), and a fixed SR list it runs through the
kernels' index logic (5 tensors, odd offsets up to 2^33 + 3, momentum; once without noise,
once with eps and xi) is replayed through fused_flat.backends.reference.restore_and_step_
(stochastic_rounding=True), tensor by tensor at its offset.
"""
from __future__ import annotations

import re

import torch

from fused_flat import noise
from fused_flat.backends import reference
from tests.helpers import run_host_program


def test_multi_langevin_index_logic_on_host(tmp_path):
    run = run_host_program("multi_langevin_emulation.cpp", tmp_path)
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
    _check_sr_reference(run.stdout)


def _bits(text: str, dtype: torch.dtype) -> torch.Tensor:
    h = torch.tensor([int(x, 16) for x in text.split(",")], dtype=torch.int32)
    return torch.where(h >= 0x8000, h - 0x10000, h).to(torch.int16).view(dtype)


def _check_sr_reference(stdout: str) -> None:
    """The SR multi-tensor step (emulated) against fused_flat.backends.reference: bit for bit without
    noise; with eps and xi the reference's libm-style noise differs from elementwise.h's by
    ~1e-7, which can move an fp32 result across a rounding threshold, so there at most one
    element in 256 may differ, by one 16-bit ulp."""
    lines = re.findall(r"^srref (\w+) (\d) (\d+) (\d+) theta=(\S+) g=(\S+) m=(\S+) out=(\S+) "
                       r"mout=(\S+)$", stdout, re.M)
    assert len(lines) == 20, stdout[-2000:]
    diffs = total = 0
    for name, noisy, _t, off, th, g, m, out, mout in lines:
        dtype = torch.bfloat16 if name == "bf16" else torch.float16
        noisy = noisy == "1"
        p, gg, mm = _bits(th, dtype), _bits(g, dtype), _bits(m, dtype)
        reference.restore_and_step_(p, gg, mm, None, None, 0x2545F4914F6CDD1D, 3, 11, int(off), 1,
                                    0.0625 if noisy else 0.0, 0.125, 0.0078125, 0.875, 0.25,
                                    False, False, 0.0009765625 if noisy else 0.0, 0.5,
                                    stochastic_rounding=True)
        got, got_m = _bits(out, dtype), _bits(mout, dtype)
        if not noisy:
            assert torch.equal(p.view(torch.int16), got.view(torch.int16)), (name, off, p, got)
            assert torch.equal(mm.view(torch.int16), got_m.view(torch.int16)), (name, off)
            continue
        d = (p.view(torch.int16).int() - got.view(torch.int16).int()).abs()
        assert int(d.max()) <= 1, (name, off, p, got)
        diffs += int((d > 0).sum())
        total += d.numel()
        # the momentum buffer holds no noise: exact
        assert torch.equal(mm.view(torch.int16), got_m.view(torch.int16)), (name, off)
    assert diffs * 256 <= total, (diffs, total)
