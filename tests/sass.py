"""Reads the CUDA kernels that ship in fused_flat/_C*.so for the static tests
(tests/test_cuda_static.py), without a GPU: every kernel of every csrc/cuda source, found in
the build rather than listed by name.

For each SASS architecture of the build (``cuobjdump -lelf``) it gives, per kernel: the
mangled and demangled name, the source file it was compiled from, the element type, the
resources (``cuobjdump -res-usage``: registers, stack, local memory), the launch bound the
kernel was compiled for (``cuobjdump -elf``: EIATTR_MAX_THREADS, EIATTR_MAXREG_COUNT), the
SASS (``cuobjdump -sass``) and whether the template says it is a 16-byte vector path. From the
sources it reads the kernel templates (``__global__`` functions and their template parameter
names) and the block size of every launch (``<<<grid, block, ...>>>``, constants resolved).

Every reader is cached per process; a missing tool or a CUDA-less build skips the caller.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
import shutil
import subprocess
from functools import lru_cache

import pytest
import torch  # noqa: F401  (libc10 before the extension)

from fused_flat.backends import _native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")

# Hardware limits of the shipped architectures (sm_80, sm_90; the same on both).
REGS_PER_SM = 65536          # 32-bit registers of an SM (and the most one block may use)
MAX_THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32
MAX_REGS_PER_THREAD = 255
REG_ALLOC_UNIT = 256         # registers are given to a warp in units of 256 (8 per thread)

ELEMENT_BYTES = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2}


def so_path() -> str:
    if not _native.available():
        pytest.fail(f"the extension is not built ({_native.load_error}); build it first")
    if not _native.cuda_built():
        pytest.skip("fused_flat._C was built without CUDA kernels (FORCE_CUDA=0 or no nvcc)")
    return _native._C.__file__


def cuobjdump() -> str:
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
    pytest.skip("cuobjdump not found (looked in triton/backends/nvidia/bin, PATH, CUDA_HOME/bin)")


def _run(*args: str) -> str:
    return subprocess.run([cuobjdump(), *args, so_path()], capture_output=True, text=True,
                          check=True, timeout=300).stdout


# ------------------------------------------------------------------ what the build ships
def build_archs() -> tuple[list[str], list[str]]:
    """(SASS archs, PTX archs) the build was asked for (TORCH_CUDA_ARCH_LIST as recorded in
    the extension): "8.0;9.0+PTX" -> (["sm_80", "sm_90"], ["sm_90"])."""
    so_path()
    spec = (_native.build_info() or {}).get("cuda_archs") or "8.0;9.0+PTX"
    sass, ptx = [], []
    for item in re.split(r"[;\s]+", spec.strip()):
        if not item:
            continue
        num = item.replace("+PTX", "").replace(".", "")
        sass.append(f"sm_{num}")
        if item.endswith("+PTX"):
            ptx.append(f"sm_{num}")
    return sass, ptx


@lru_cache(maxsize=None)
def listing() -> str:
    """``cuobjdump -lelf -lptx``: the cubin and PTX files, e.g. kernels_cuda.sm_80.cubin."""
    return _run("-lelf") + _run("-lptx")


# ------------------------------------------------------------------ the sources
def cuda_sources() -> list[str]:
    return sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")) + glob.glob(os.path.join(CUDA_DIR, "*.cuh")))


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


@lru_cache(maxsize=None)
def _source_texts() -> dict[str, str]:
    out = {}
    for path in cuda_sources():
        with open(path) as f:
            out[os.path.basename(path)] = _strip_comments(f.read())
    return out


@lru_cache(maxsize=None)
def int_constants() -> dict[str, int]:
    """``constexpr int NAME = <literal>;`` of every CUDA source (the block sizes)."""
    out = {}
    for text in _source_texts().values():
        for m in re.finditer(r"constexpr\s+(?:unsigned\s+)?(?:int|int64_t|unsigned)\s+(\w+)\s*=\s*(\d+)\s*;", text):
            out.setdefault(m.group(1), int(m.group(2)))
    return out


def resolve_int(expr: str) -> int | None:
    expr = expr.strip()
    if re.fullmatch(r"\d+", expr):
        return int(expr)
    return int_constants().get(expr.split("::")[-1])


_KERNEL_DEF = re.compile(
    r"(?:template\s*<(?P<tparams>[^{};]*?)>\s*)?__global__\s+void\s+"
    r"(?:__launch_bounds__\s*\((?P<lb>(?:[^()]|\([^()]*\))*)\)\s*)?(?P<name>\w+)\s*\(")


@lru_cache(maxsize=None)
def kernel_templates() -> dict[str, dict]:
    """{kernel name: dict(file, params=[template parameter names])} of the sources."""
    out = {}
    for fname, text in _source_texts().items():
        for m in _KERNEL_DEF.finditer(text):
            params = []
            for p in (m.group("tparams") or "").split(","):
                words = re.findall(r"\w+", p.split("=")[0])
                if words:
                    params.append(words[-1])
            out[m.group("name")] = dict(file=fname, params=params)
    return out


@lru_cache(maxsize=None)
def launch_block_sizes() -> dict[str, list[int | None]]:
    """{source file: block size of each ``<<<grid, block, ...>>>`` launch in it} (None: the
    expression is not a literal or a constexpr constant)."""
    out = {}
    for fname, text in _source_texts().items():
        sizes = []
        for m in re.finditer(r"<<<(.*?)>>>", text, flags=re.S):
            args, depth, cur = [], 0, ""
            for ch in m.group(1):
                if ch in "([{<":
                    depth += 1
                elif ch in ")]}>":
                    depth -= 1
                if ch == "," and depth == 0:
                    args.append(cur)
                    cur = ""
                else:
                    cur += ch
            args.append(cur)
            if len(args) >= 2:
                sizes.append(resolve_int(args[1]))
        if sizes:
            out[fname] = sizes
    return out


# ------------------------------------------------------------------ the kernels
@dataclasses.dataclass
class Kernel:
    mangled: str
    demangled: str
    source: str              # the .cu file it was compiled from (basename)
    regs: int
    stack: int
    local: int
    sass: str
    max_threads: int | None = None    # __launch_bounds__ (EIATTR_MAX_THREADS), None if absent
    maxreg: int | None = None         # the register cap ptxas applied (EIATTR_MAXREG_COUNT)

    @property
    def name(self) -> str:
        return _split_demangled(self.demangled)[0]

    @property
    def template_args(self) -> list[str]:
        return _split_demangled(self.demangled)[1]

    @property
    def dtype(self) -> str | None:
        """The element type: the first floating-point template argument."""
        return next((a for a in self.template_args if a in ELEMENT_BYTES), None)

    @property
    def flags(self) -> dict[str, str]:
        """Template parameter name -> argument, names from the source template."""
        params = kernel_templates().get(self.name, {}).get("params", [])
        return dict(zip(params, self.template_args))

    @property
    def vectorised(self) -> bool:
        """The 16-byte vector path: a kernel whose template has a ``kVec`` parameter is one
        when kVec is true (kVec = false: the scalar pair path for unaligned buckets); a
        kernel without it vectorises every element type."""
        return self.flags.get("kVec", "true") == "true"

    @property
    def is_reduction(self) -> bool:
        """Block-level reduction (a barrier in the SASS): its output is one value per block
        or grid, not an element stream."""
        return re.search(r"\bBAR\.", self.sass) is not None

    @property
    def label(self) -> str:
        args = ", ".join(self.template_args)
        return f"{self.name}<{args}> ({self.source})"

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.sass))


def _split_demangled(d: str) -> tuple[str, list[str]]:
    """'void ns::k<float, 4, true>(float*, ...)' -> ('k', ['float', '4', 'true'])."""
    s = d[5:] if d.startswith("void ") else d
    depth, i = 0, 0
    while i < len(s) and s[i] not in "<(":
        i += 1
    name = s[:i].split("::")[-1]
    args: list[str] = []
    if i < len(s) and s[i] == "<":
        cur, depth = "", 0
        for ch in s[i + 1:]:
            if ch == "<":
                depth += 1
            elif ch == ">":
                if depth == 0:
                    break
                depth -= 1
            if ch == "," and depth == 0:
                args.append(cur.strip())
                cur = ""
            else:
                cur += ch
        args.append(cur.strip())
    return name, [a for a in args if a]


def _demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        pytest.skip("c++filt not found (binutils)")
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True,
                         check=True, timeout=60).stdout.splitlines()
    assert len(out) == len(names)
    return out


def _launch_attrs(elf: str) -> dict[str, dict]:
    """{mangled kernel: {max_threads, maxreg}} from the .nv.info.<kernel> sections."""
    out: dict[str, dict] = {}
    cur, want = None, None
    for line in elf.splitlines():
        if line.startswith(".nv.info."):
            cur = line[len(".nv.info."):].strip()
            out.setdefault(cur, {})
            want = None
        elif line.startswith(".") and not line.startswith(".nv.info"):
            cur, want = None, None
        elif cur is not None:
            if "EIATTR_MAX_THREADS" in line:
                want = "max_threads"
            elif "EIATTR_MAXREG_COUNT" in line:
                want = "maxreg"
            elif want and line.strip().startswith("Value:"):
                vals = [int(v, 16) for v in re.findall(r"0x[0-9a-fA-F]+", line)]
                if want == "max_threads":
                    n = 1
                    for v in vals:
                        n *= v
                    out[cur]["max_threads"] = n
                else:
                    out[cur]["maxreg"] = vals[0]
                want = None
    return out


@lru_cache(maxsize=None)
def kernels(arch: str) -> tuple[Kernel, ...]:
    """Every kernel in the SASS of one architecture (e.g. "sm_80")."""
    res = _run("-res-usage", "-arch", arch)
    sass = _run("-sass", "-arch", arch)
    elf = _run("-elf", "-arch", arch)
    found = []
    source = "?"
    for m in re.finditer(r"identifier = (\S+)|Function (\S+):\s*\n?\s*REG:(\d+) STACK:(\d+) "
                         r"SHARED:\d+ LOCAL:(\d+)", res):
        if m.group(1):
            source = os.path.basename(m.group(1))
            continue
        found.append((m.group(2), source, int(m.group(3)), int(m.group(4)), int(m.group(5))))
    code = {}
    for chunk in sass.split("Function : ")[1:]:
        code[chunk.split(None, 1)[0]] = chunk
    attrs = _launch_attrs(elf)
    names = _demangle([f[0] for f in found]) if found else []
    out = []
    for (mangled, src, regs, stack, local), dem in zip(found, names):
        a = attrs.get(mangled, {})
        out.append(Kernel(mangled, dem, src, regs, stack, local, code.get(mangled, ""),
                          a.get("max_threads"), a.get("maxreg")))
    return tuple(out)


def reg_alloc(regs: int) -> int:
    """Registers a thread really takes: whole allocation units per warp."""
    per_warp = -(-max(regs, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    return per_warp // 32


def block_size(k: Kernel) -> int:
    """The block size the kernel must run with: its __launch_bounds__ if compiled with one,
    else the largest block its source file launches with (1024, the hardware limit, if no
    launch there resolves)."""
    if k.max_threads:
        return k.max_threads
    sizes = [s for s in launch_block_sizes().get(k.source, []) if s]
    return max(sizes) if sizes else 1024


def resident_blocks_by_registers(k: Kernel) -> int:
    threads = -(-block_size(k) // 32) * 32
    return min(MAX_BLOCKS_PER_SM, REGS_PER_SM // (reg_alloc(k.regs) * threads))
