"""Static checks of the CUDA kernels that ship in fused_flat/_C*.so (no GPU needed).

For every kernel instantiation and for each target architecture (sm_80, sm_90), read the
machine code (SASS) of the built extension with ``cuobjdump`` and assert:

  * no register spills: no local-memory instruction (STL/LDL) in the SASS, and LOCAL:0 /
    STACK:0 in ``cuobjdump -res-usage``;
  * registers <= MAX_REGISTERS (below);
  * the 16-byte vector kernels move their buckets with 128-bit accesses (LDG.E.128 /
    STG.E.128): at least one per stream they read / write.

What this cannot show (a GPU run must): correctness, achieved bandwidth, occupancy at run
time. See tests/test_cuda_gpu.py.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from functools import lru_cache

import pytest
import torch  # noqa: F401  (libc10 before the extension)

from fused_flat.backends import _native

ARCHS = ("sm_80", "sm_90")

# Register bound. The kernels are launched with 256 threads per block
# (__launch_bounds__(256)). With <= 64 registers per thread, an SM's 65536 registers hold
# 1024 threads = 4 blocks (50% occupancy on sm_80 / sm_90, 2048 threads max per SM), which
# hides the global-memory latency of these streaming kernels (every thread has ~200 ALU
# instructions of Philox + Box-Muller per 2 elements in flight). Above 64 the residency
# drops to 3 blocks (768 threads, 85 regs) and then 2. Measured at the time of writing
# (CUDA 13.0): max 60 (fp64 restore with momentum and both noises), fp32 vector kernels
# <= 56, 16-bit vector kernels <= 48 on sm_90; see csrc/cuda/README_SECTION.md.
MAX_REGISTERS = 64

# Expected instantiations: perturb_kernel<T, V, vec> for fp32/bf16/fp16 (vector + pair
# path) and fp64 (pair path) = 7; restore_and_step_kernel<T, V, vec, mom, eps, xi> = 3 * 2 * 8
# + 8 = 56.
N_PERTURB, N_RESTORE = 7, 56

_DTYPE = {"f": "fp32", "d": "fp64", "N3c108BFloat16E": "bf16", "N3c104HalfE": "fp16"}
_NAME = re.compile(r"(perturb_kernel|restore_and_step_kernel)I(f|d|N3c108BFloat16E|N3c104HalfE)"
                   r"Li(\d+)E((?:Lb[01]E)+)E")


def _so_path() -> str:
    if not _native.available():
        pytest.fail(f"the extension is not built ({_native.load_error}); build it first")
    if not _native.cuda_built():
        pytest.skip("fused_flat._C was built without CUDA kernels (FORCE_CUDA=0 or no nvcc)")
    return _native._C.__file__


def _cuobjdump() -> str:
    cands = []
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cands.append(os.path.join(loc, "backends", "nvidia", "bin", "cuobjdump"))
    cands += [shutil.which("cuobjdump") or "",
              os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    pytest.fail("cuobjdump not found (looked in triton/backends/nvidia/bin, PATH, CUDA_HOME/bin)")


def _parse_name(mangled: str):
    m = _NAME.search(mangled)
    if m is None:
        return None
    kind, dt, v, bools = m.groups()
    flags = tuple(b == "1" for b in re.findall(r"Lb([01])E", bools))
    info = {"kind": "perturb" if kind == "perturb_kernel" else "restore", "dtype": _DTYPE[dt],
            "V": int(v), "vec": flags[0]}
    if info["kind"] == "restore":
        info.update(mom=flags[1], eps=flags[2], xi=flags[3])
    return info


@lru_cache(maxsize=None)
def _kernels(arch: str):
    """{mangled name: dict(info, regs, local, stack, sass)} of one architecture."""
    so, tool = _so_path(), _cuobjdump()
    res = subprocess.run([tool, "-res-usage", "-arch", arch, so], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    sass = subprocess.run([tool, "-sass", "-arch", arch, so], capture_output=True, text=True,
                          check=True, timeout=120).stdout
    out = {}
    for m in re.finditer(r"Function (\S+):\s*\n?\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", res):
        name, regs, stack, local = m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4))
        info = _parse_name(name)
        if info is None:
            continue
        out[name] = dict(info, regs=regs, stack=stack, local=local, sass=None)
    for chunk in sass.split("Function : ")[1:]:
        name = chunk.split(None, 1)[0]
        if name in out:
            out[name]["sass"] = chunk
    return out


def _label(k):
    if k["kind"] == "perturb":
        return f"perturb<{k['dtype']},{'vec' if k['vec'] else 'pair'}>"
    return (f"restore<{k['dtype']},{'vec' if k['vec'] else 'pair'},mom={int(k['mom'])},"
            f"eps={int(k['eps'])},xi={int(k['xi'])}>")


@pytest.mark.parametrize("arch", ARCHS)
def test_all_kernels_present(arch):
    ks = _kernels(arch).values()
    n_p = sum(k["kind"] == "perturb" for k in ks)
    n_r = sum(k["kind"] == "restore" for k in ks)
    assert (n_p, n_r) == (N_PERTURB, N_RESTORE), (
        f"{arch}: found {n_p} perturb and {n_r} restore_and_step kernels in the .so, expected "
        f"{N_PERTURB} and {N_RESTORE} (is {arch} in TORCH_CUDA_ARCH_LIST?)")
    assert all(k["sass"] for k in ks), f"{arch}: SASS missing for some kernels"
    vec = {(k["kind"], k["dtype"]) for k in ks if k["vec"]}
    assert {("perturb", d) for d in ("fp32", "bf16", "fp16")} <= vec
    assert {("restore", d) for d in ("fp32", "bf16", "fp16")} <= vec


@pytest.mark.parametrize("arch", ARCHS)
def test_no_spills(arch):
    bad = []
    for k in _kernels(arch).values():
        spills = re.findall(r"\b(?:STL|LDL)(?:\.[A-Z0-9]+)*\b", k["sass"])
        if spills or k["local"] or k["stack"]:
            bad.append(f"{_label(k)}: {len(spills)} STL/LDL, LOCAL:{k['local']} STACK:{k['stack']}")
    assert not bad, f"{arch}: local-memory use (register spills):\n" + "\n".join(bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_register_bound(arch):
    ks = list(_kernels(arch).values())
    over = [f"{_label(k)}: {k['regs']}" for k in ks if k["regs"] > MAX_REGISTERS]
    assert not over, f"{arch}: kernels above {MAX_REGISTERS} registers:\n" + "\n".join(over)
    assert max(k["regs"] for k in ks) > 16, "implausible register counts: parsing is broken"


@pytest.mark.parametrize("arch", ARCHS)
def test_vector_kernels_use_128bit_accesses(arch):
    bad = []
    checked = 0
    for k in _kernels(arch).values():
        if not k["vec"]:
            continue
        assert k["V"] * {"fp32": 4, "bf16": 2, "fp16": 2}[k["dtype"]] == 16, _label(k)
        loads = len(re.findall(r"\bLDG\.E\.128\b", k["sass"]))
        stores = len(re.findall(r"\bSTG\.E\.128\b", k["sass"]))
        if k["kind"] == "perturb":
            need_l, need_s = 1, 1                      # theta
        else:
            need_l = 2 + int(k["mom"])                 # theta, g, [m]
            need_s = 1 + int(k["mom"])                 # theta, [m]
        checked += 1
        if loads < need_l or stores < need_s:
            bad.append(f"{_label(k)}: {loads} LDG.E.128 (need >= {need_l}), "
                       f"{stores} STG.E.128 (need >= {need_s})")
    assert checked == 3 * (1 + 8), f"{arch}: expected 27 vector kernels, checked {checked}"
    assert not bad, f"{arch}: vector kernels without 128-bit global accesses:\n" + "\n".join(bad)
