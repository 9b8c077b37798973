"""Static checks of the multi-tensor Langevin CUDA kernels (csrc/cuda/multi_langevin.cu) in the
built fused_flat/_C*.so, without a GPU, as tests/test_cuda_sam_static.py does for the SAM
family:

  * every instantiation is present in the SASS of sm_80 and sm_90: ml_perturb_kernel<T> 4,
    ml_restore_step_kernel<T, momentum, eps, xi, sr> 48 (32 round-to-nearest, T in
    fp32/fp64/bf16/fp16, and 16 with stochastic rounding, T in bf16/fp16 only),
    ml_all_finite_kernel<T> 4;
  * no register spills (no STL/LDL, LOCAL:0 STACK:0) and <= 64 registers (4 blocks of 256
    threads per SM; __launch_bounds__(256, 4));
  * 16-byte accesses: >= 1 LDG.E.128 per stream the kernel reads and >= 1 STG.E.128 per
    stream it writes (fp64 too: a unit is two 16-byte vectors). all_finite<fp64> is exempt:
    its check needs only the high word of each double, and ptxas narrows the 16-byte load.
"""
from __future__ import annotations

import re
import subprocess
from functools import lru_cache

import pytest

from tests.test_cuda_static import _cuobjdump, _so_path

ARCHS = ("sm_80", "sm_90")
MAX_REGISTERS = 64
_DT = r"(f|d|N3c108BFloat16E|N3c104HalfE)"
_NAME = re.compile(r"mlang\d+(ml_perturb_kernel|ml_restore_step_kernel|ml_all_finite_kernel)I"
                   + _DT + r"((?:Lb[01]E)*)E")
COUNTS = {"ml_perturb_kernel": 4, "ml_restore_step_kernel": 48, "ml_all_finite_kernel": 4}


def _streams(kind, flags):
    """(reads, writes) of 16-byte streams the SASS must show."""
    if kind == "ml_perturb_kernel":
        return 1, 1
    if kind == "ml_all_finite_kernel":
        return 1, 0
    mom = flags[0]
    return (3, 2) if mom else (2, 1)


@lru_cache(maxsize=None)
def _kernels(arch: str):
    so, tool = _so_path(), _cuobjdump()
    res = subprocess.run([tool, "-res-usage", "-arch", arch, so], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    sass = subprocess.run([tool, "-sass", "-arch", arch, so], capture_output=True, text=True,
                          check=True, timeout=120).stdout
    out = {}
    for m in re.finditer(r"Function (\S+):\s*\n?\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", res):
        k = _NAME.search(m.group(1))
        if k is None:
            continue
        flags = tuple(f == "1" for f in re.findall(r"Lb([01])E", k.group(3)))
        out[m.group(1)] = dict(kind=k.group(1), dtype=k.group(2), flags=flags, regs=int(m.group(2)),
                               stack=int(m.group(3)), local=int(m.group(4)), sass=None)
    for chunk in sass.split("Function : ")[1:]:
        name = chunk.split(None, 1)[0]
        if name in out:
            out[name]["sass"] = chunk
    return out


def _label(k):
    return f"{k['kind']}<{k['dtype']},{k['flags']}>"


@pytest.mark.parametrize("arch", ARCHS)
def test_all_multi_langevin_kernels_present(arch):
    ks = list(_kernels(arch).values())
    got = {kind: sum(k["kind"] == kind for k in ks) for kind in COUNTS}
    assert got == COUNTS, f"{arch}: {got} (is {arch} in TORCH_CUDA_ARCH_LIST?)"
    assert all(k["sass"] for k in ks), f"{arch}: SASS missing for some kernels"


@pytest.mark.parametrize("arch", ARCHS)
def test_stochastic_rounding_instantiations(arch):
    """ml_restore_step_kernel<T, mom, eps, xi, sr>: sr = 1 exactly for bf16/fp16 x 8 flag
    combinations (the SR pass of restore_and_step_multi_), never for fp32/fp64."""
    ks = [k for k in _kernels(arch).values() if k["kind"] == "ml_restore_step_kernel"]
    assert all(len(k["flags"]) == 4 for k in ks), [_label(k) for k in ks]
    sr = [k for k in ks if k["flags"][3]]
    assert sorted({k["dtype"] for k in sr}) == ["N3c104HalfE", "N3c108BFloat16E"], [_label(k) for k in sr]
    assert len({(k["dtype"], k["flags"]) for k in sr}) == 16
    assert len({(k["dtype"], k["flags"]) for k in ks if not k["flags"][3]}) == 32


@pytest.mark.parametrize("arch", ARCHS)
def test_no_spills_and_register_bound(arch):
    bad = []
    for k in _kernels(arch).values():
        spills = re.findall(r"\b(?:STL|LDL)(?:\.[A-Z0-9]+)*\b", k["sass"])
        if spills or k["local"] or k["stack"] or k["regs"] > MAX_REGISTERS:
            bad.append(f"{_label(k)}: {len(spills)} STL/LDL, LOCAL:{k['local']} "
                       f"STACK:{k['stack']} REG:{k['regs']}")
    assert not bad, f"{arch}:\n" + "\n".join(bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_128bit_accesses(arch):
    bad = []
    for k in _kernels(arch).values():
        if k["kind"] == "ml_all_finite_kernel" and k["dtype"] == "d":
            continue
        reads, writes = _streams(k["kind"], k["flags"])
        ld = len(re.findall(r"\bLDG\.E\.128(?:\.[A-Z]+)*\b", k["sass"]))
        st = len(re.findall(r"\bSTG\.E\.128\b", k["sass"]))
        if ld < reads or st < writes:
            bad.append(f"{_label(k)}: {ld} LDG.E.128 (need {reads}), {st} STG.E.128 (need {writes})")
    assert not bad, f"{arch}:\n" + "\n".join(bad)


def test_ptx_embedded():
    so, tool = _so_path(), _cuobjdump()
    listing = subprocess.run([tool, "-lptx", so], capture_output=True, text=True, check=True,
                             timeout=120).stdout
    assert re.search(r"multi_langevin\.sm_\d+\.ptx", listing), listing
