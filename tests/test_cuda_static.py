"""Static checks of every CUDA kernel that ships in fused_flat/_C*.so (no GPU needed).

The kernels are found in the build (tests/sass.py: ``cuobjdump`` of the extension, names
demangled, template parameter names read from csrc/cuda), not listed here, so a kernel that
is added, renamed or re-templated is checked as it is. For each SASS architecture of the
build (default sm_80 and sm_90), every kernel:

  * is compiled: each ``__global__`` template of csrc/cuda has code for every architecture,
    and each source with kernels ships PTX for the "+PTX" architectures (newer GPUs JIT it);
  * does not spill: no local-memory instruction (STL/LDL) in its SASS, LOCAL:0 and STACK:0
    in ``cuobjdump -res-usage``;
  * can be launched with its block size: registers <= 255 and <= the cap ptxas applied
    (``__launch_bounds__(threads, min_blocks)``), and registers x block size <= the 64K
    registers one block may use, the block size being the kernel's ``__launch_bounds__``,
    which must cover every ``<<<grid, block>>>`` launch of its source file;
  * keeps half of the SM's 2048 threads resident as far as registers go (256-thread
    blocks: <= 64 registers, 4 blocks per SM): these streaming kernels hide global-memory
    latency with the ~200 Philox + Box-Muller instructions per element pair of the threads
    in flight;
  * if it is a 16-byte vector path of fp32 / bf16 / fp16 (every kernel, except the
    instantiations whose template parameter ``kVec`` is false: the scalar pair path of
    unaligned buckets), loads with 128-bit accesses (LDG.E.128) and, unless it is a block
    reduction (a barrier; it writes one value per block), stores with them (STG.E.128).

What this cannot show (a GPU run must): correctness, achieved bandwidth, occupancy at run
time. See tests/test_cuda_gpu.py.
"""
from __future__ import annotations

import os
import re

import pytest

from fused_flat.backends import _native
from tests import sass
from tests.sass import cuobjdump as _cuobjdump, so_path as _so_path  # noqa: F401  (used elsewhere)


def _archs() -> list[str]:
    """The SASS architectures the build was asked for (collection time: never skips)."""
    try:
        spec = (_native.build_info() or {}).get("cuda_archs") if _native.available() else None
    except Exception:  # noqa: BLE001  (a broken build: the tests themselves report it)
        spec = None
    spec = spec or "8.0;9.0+PTX"
    return [f"sm_{a.replace('+PTX', '').replace('.', '')}" for a in re.split(r"[;\s]+", spec) if a]


ARCHS = _archs()
_SPILL = r"\b(?:STL|LDL)(?:\.[A-Z0-9]+)*\b"


def _kernels(arch: str):
    ks = sass.kernels(arch)
    assert ks, f"{arch}: no kernel in the SASS of {_so_path()} (is {arch} in TORCH_CUDA_ARCH_LIST?)"
    return ks


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kernel_compiled(arch):
    ks = _kernels(arch)
    templates = sass.kernel_templates()
    assert templates, f"no __global__ kernel found in {sass.CUDA_DIR}: the source parser is broken"
    built = {k.name for k in ks}
    missing = sorted(set(templates) - built)
    assert not missing, f"{arch}: kernels of csrc/cuda with no code in the .so: {missing}"
    no_code = [k.label for k in ks if not k.sass]
    assert not no_code, f"{arch}: no SASS for:\n" + "\n".join(no_code)
    unknown = sorted({k.name for k in ks} - set(templates))
    assert not unknown, f"{arch}: kernels whose template the parser did not find: {unknown}"
    for k in ks:
        assert len(k.flags) == len(k.template_args), (
            f"{k.label}: template parameters {templates[k.name]['params']} do not match the "
            f"arguments {k.template_args}")


def test_ptx_embedded():
    _, ptx_archs = sass.build_archs()
    if not ptx_archs:
        pytest.skip("the build ships no PTX (no '+PTX' in TORCH_CUDA_ARCH_LIST)")
    listing = sass.listing()
    files = sorted({t["file"] for t in sass.kernel_templates().values()})
    missing = [f"{os.path.splitext(f)[0]}.{a}.ptx" for f in files for a in ptx_archs
               if not re.search(re.escape(os.path.splitext(f)[0]) + r"\." + a + r"\.ptx", listing)]
    assert not missing, f"PTX missing from the .so: {missing}\n{listing}"


@pytest.mark.parametrize("arch", ARCHS)
def test_no_spills(arch):
    bad = []
    for k in _kernels(arch):
        spills = k.count(_SPILL)
        if spills or k.local or k.stack:
            bad.append(f"{k.label}: {spills} STL/LDL, LOCAL:{k.local} STACK:{k.stack}")
    assert not bad, f"{arch}: local-memory use (register spills):\n" + "\n".join(bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_registers_allow_the_launch(arch):
    ks = _kernels(arch)
    assert max(k.regs for k in ks) > 16, "implausible register counts: parsing is broken"
    launches = sass.launch_block_sizes()
    bad = []
    for k in ks:
        threads = sass.block_size(k)
        use = sass.reg_alloc(k.regs) * (-(-threads // 32) * 32)
        if k.regs > sass.MAX_REGS_PER_THREAD or (k.maxreg is not None and k.regs > k.maxreg):
            bad.append(f"{k.label}: {k.regs} registers, cap {k.maxreg}")
        if use > sass.REGS_PER_SM:
            bad.append(f"{k.label}: {k.regs} registers x {threads} threads = {use} > "
                       f"{sass.REGS_PER_SM} per block: the launch fails")
        if k.max_threads is not None:
            over = [b for b in launches.get(k.source, []) if b and b > k.max_threads]
            if over:
                bad.append(f"{k.label}: __launch_bounds__({k.max_threads}) but {k.source} "
                           f"launches blocks of {over}")
    assert not bad, f"{arch}:\n" + "\n".join(bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_register_occupancy(arch):
    """Enough resident threads to keep HBM busy: half an SM; fp64 kernels 3/8 of one (a
    double takes two registers: the fp64 restore+step kernels need ~74 and spill under a
    64-register cap, measured)."""
    bad = []
    for k in _kernels(arch):
        need = sass.MAX_THREADS_PER_SM // 2 if k.dtype != "double" else 3 * sass.MAX_THREADS_PER_SM // 8
        threads = sass.block_size(k)
        blocks = sass.resident_blocks_by_registers(k)
        if blocks * threads < need:
            bad.append(f"{k.label}: {k.regs} registers, {threads}-thread blocks: {blocks} "
                       f"resident ({blocks * threads} threads < {need})")
    assert not bad, f"{arch}: registers cap the occupancy below half an SM:\n" + "\n".join(bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_vector_kernels_use_128bit_accesses(arch):
    bad, checked = [], 0
    for k in _kernels(arch):
        if not k.vectorised or k.dtype not in ("float", "c10::BFloat16", "c10::Half"):
            continue
        checked += 1
        loads = k.count(r"\bLDG\.E\.128\b")
        stores = k.count(r"\bSTG\.E\.128\b")
        if loads == 0 or (stores == 0 and not k.is_reduction):
            bad.append(f"{k.label}: {loads} LDG.E.128, {stores} STG.E.128"
                       + (" (reduction: no store needed)" if k.is_reduction else ""))
    assert checked, f"{arch}: no 16-byte vector kernel found: the name/template parsing is broken"
    assert not bad, f"{arch}: vector kernels without 128-bit global accesses:\n" + "\n".join(bad)
