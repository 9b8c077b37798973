"""Static checks of the multi-tensor SAM CUDA kernels (csrc/cuda/sam_cuda.cu) in the built
fused_flat/_C*.so, without a GPU, as tests/test_cuda_static.py does for the flat passes:

  * every instantiation is present in the SASS of sm_80 and sm_90:
    sam_sq_norm_kernel<T, adaptive> 8, sam_perturb_kernel<T, adaptive> 8,
    sam_restore_step_kernel<T, momentum> 8, sam_probe_kernel<T> 4 (T in fp32/fp64/bf16/fp16),
    sam_restore_step_sr_kernel<T, momentum> 4 (stochastic rounding, T in bf16/fp16);
  * no register spills (no STL/LDL, LOCAL:0 STACK:0) and <= 64 registers (4 blocks of 256
    threads per SM);
  * 16-byte accesses: >= 1 LDG.E.128 per stream the kernel reads and >= 1 STG.E.128 per
    stream it writes (every kernel has the vector path, fp64 included: 2 doubles = 16 B);
  * PTX is embedded (the default TORCH_CUDA_ARCH_LIST "8.0;9.0+PTX": newer GPUs JIT it).
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
_NAME = re.compile(r"multi\d+(sam_sq_norm_kernel|sam_perturb_kernel|sam_restore_step_kernel|"
                   r"sam_restore_step_sr_kernel|sam_probe_kernel)I" + _DT + r"(Lb([01])E)?E")
# streams read / written: (kind, flag) -> (reads, writes)
STREAMS = {("sam_sq_norm_kernel", False): (1, 0), ("sam_sq_norm_kernel", True): (2, 0),
           ("sam_perturb_kernel", False): (2, 2), ("sam_perturb_kernel", True): (2, 2),
           ("sam_restore_step_kernel", False): (2, 1), ("sam_restore_step_kernel", True): (3, 2),
           ("sam_restore_step_sr_kernel", False): (2, 1),
           ("sam_restore_step_sr_kernel", True): (3, 2),
           ("sam_probe_kernel", None): (1, 2)}
COUNTS = {"sam_sq_norm_kernel": 8, "sam_perturb_kernel": 8, "sam_restore_step_kernel": 8,
          "sam_restore_step_sr_kernel": 4, "sam_probe_kernel": 4}


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
        flag = None if k.group(4) is None else k.group(4) == "1"
        out[m.group(1)] = dict(kind=k.group(1), dtype=k.group(2), flag=flag, regs=int(m.group(2)),
                               stack=int(m.group(3)), local=int(m.group(4)), sass=None)
    for chunk in sass.split("Function : ")[1:]:
        name = chunk.split(None, 1)[0]
        if name in out:
            out[name]["sass"] = chunk
    return out


def _label(k):
    return f"{k['kind']}<{k['dtype']},{k['flag']}>"


@pytest.mark.parametrize("arch", ARCHS)
def test_all_sam_kernels_present(arch):
    ks = list(_kernels(arch).values())
    got = {kind: sum(k["kind"] == kind for k in ks) for kind in COUNTS}
    assert got == COUNTS, f"{arch}: {got} (is {arch} in TORCH_CUDA_ARCH_LIST?)"
    assert all(k["sass"] for k in ks), f"{arch}: SASS missing for some kernels"


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
        reads, writes = STREAMS[(k["kind"], k["flag"])]
        ld = len(re.findall(r"\bLDG\.E\.128(?:\.[A-Z]+)*\b", k["sass"]))
        st = len(re.findall(r"\bSTG\.E\.128\b", k["sass"]))
        if ld < reads or st < writes:
            bad.append(f"{_label(k)}: {ld} LDG.E.128 (need {reads}), {st} STG.E.128 (need {writes})")
    assert not bad, f"{arch}:\n" + "\n".join(bad)


def test_ptx_embedded():
    so, tool = _so_path(), _cuobjdump()
    listing = subprocess.run([tool, "-lptx", so], capture_output=True, text=True, check=True,
                             timeout=120).stdout
    assert re.search(r"sam_cuda\.sm_\d+\.ptx", listing), listing
    assert re.search(r"kernels_cuda\.sm_\d+\.ptx", listing), listing
