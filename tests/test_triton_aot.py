"""Static GPU checks of the Triton kernels without a GPU: ahead-of-time compile for sm_80 and
sm_90 and assert no register spills, 128-bit global loads/stores, and a register bound; and
trace the ops as torch.compile's AOT stage does (fake CUDA tensors, functionalization) to
check that the graph holds the Triton kernels themselves.

The compile runs in a subprocess (this file run as a script) with TRITON_INTERPRET unset:
conftest.py switches the interpreter on for the whole session, and under it @triton.jit
returns interpreted functions that cannot be compiled.

What this guarantees: the kernels compile for both architectures, keep everything in
registers (no local-memory traffic), vectorize the streams of whole blocks, and leave room
for enough resident warps. What it cannot show: speed, or that the numbers a GPU computes
match (FMA contraction, real bf16 rounding); only a run on a GPU shows those.

Register bound (REG_BOUND = 128): the kernels are memory-bound streams. At <= 128
registers a 64K-register SM holds >= 4 CTAs of 128 threads = 16 warps; each thread keeps
BLOCK / 128 = 8 elements of every stream in flight, i.e. >= 16*32*8*4 B = 16 KB per stream
per SM, above the ~15 KB per SM that Little's law asks for on an H100 (3.35 TB/s x ~600 ns
/ 132 SMs). The perturb kernel (one Philox call per pair, one stream) must stay <= 64.
Measured with triton 3.8 (num_warps=4, BLOCK=1024): perturb 43-55, restore_and_step
59-95 registers.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (80, 90)
REG_BOUND = {"perturb": 64, "restore_and_step": 128}
SCALARS = ("sigma", "lr", "weight_decay", "momentum", "dampening", "noise_std", "grad_mult")
RS_VARIANTS = {
    # every feature on (eps and xi: two Philox calls per 4 elements): the register peak
    "all": dict(HAS_MOM=True, NESTEROV=True, NEED_EPS=True, NEED_XI=True,
                HAS_GRAD_SCALE=True, HAS_FOUND_INF=True),
    # fSGLD as used by default: no momentum
    "fsgld": dict(HAS_MOM=False, NESTEROV=False, NEED_EPS=True, NEED_XI=True,
                  HAS_GRAD_SCALE=False, HAS_FOUND_INF=True),
    # 16-bit with stochastic rounding (its bits from the eps and xi words)
    "sr": dict(HAS_MOM=True, NESTEROV=True, NEED_EPS=True, NEED_XI=True,
               HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, SR=True, EPS_TAG0=True),
}
# bf16 buckets: the register peaks only (keeps the whole file under ~30 s on 2 cores)
BF16_VARIANTS = ("all", "sr")
FP32_VARIANTS = ("all", "fsgld")


def _compile_report() -> dict:
    """{name: {regs, stack, local, ld_v4, st_v4}} for each kernel variant, dtype and arch."""
    import triton
    import triton.backends.nvidia as nv
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fused_flat.backends.triton import perturb, restore_and_step

    cuobjdump = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")

    def build(fn, sig, const, ptrs, cc):
        names = list(sig)
        attrs = {(names.index(p),): [["tt.divisibility", 16]] for p in ptrs}
        k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", cc, 32),
                           options={"num_warps": 4})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True,
                                 check=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
        if m is None:
            raise RuntimeError(f"cannot parse cuobjdump -res-usage output:\n{res}")
        ptx = k.asm["ptx"]
        return dict(regs=int(m[1]), stack=int(m[2]), shared=int(m[3]), local=int(m[4]),
                    ld_v4=bool(re.search(r"ld\.global(\.\w+)*\.v4", ptx)),
                    st_v4=bool(re.search(r"st\.global(\.\w+)*\.v4", ptx)))

    out = {}
    for dt in ("fp32", "bf16"):
        for cc in ARCHS:
            sig = {"param_ptr": f"*{dt}", "key": "i64", "bw": "i32", "step_lo": "i64", "tag": "i32",
                   "sigma": "fp32", "offset": "i64", "n": "i64", "MIS": "constexpr",
                   "BLOCK": "constexpr"}
            out[f"perturb/{dt}/sm{cc}"] = build(perturb.perturb_kernel, sig,
                                                {"MIS": 0, "BLOCK": perturb.BLOCK}, ["param_ptr"], cc)
            for name, flags in RS_VARIANTS.items():
                if name not in (BF16_VARIANTS if dt == "bf16" else FP32_VARIANTS):
                    continue
                mom = flags["HAS_MOM"]
                sig = {"param_ptr": f"*{dt}", "grad_ptr": f"*{dt}",
                       "mom_ptr": f"*{dt}" if mom else "constexpr",
                       "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32", "key": "i64", "bw": "i32",
                       "step_lo": "i64", "offset": "i64", "n": "i64", "restore_tag": "i32"}
                sig.update({s: "fp32" for s in SCALARS})
                sig["momentum_init"] = "i32"
                const = dict(dict(SR=False, EPS_TAG0=False), **flags, MIS=0,
                             BLOCK=restore_and_step.BLOCK, IS_BF16=dt == "bf16")
                sig.update({c: "constexpr" for c in const})
                if not mom:
                    const["mom_ptr"] = None
                ptrs = ["param_ptr", "grad_ptr"] + (["mom_ptr"] if mom else [])
                out[f"restore_and_step[{name}]/{dt}/sm{cc}"] = build(
                    restore_and_step.restore_and_step_kernel, sig, const, ptrs, cc)
    return out


def _trace_report() -> str:
    """The graph torch.compile's AOT stage would see for one optimizer step: the ops traced
    with fake CUDA tensors under functionalization (as AOTAutograd does), which decomposes a
    triton_op into triton_kernel_wrapper_functional higher-order ops."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    import fused_flat.backends.triton as ft

    def step(p, g, m, found_inf):
        ft.perturb_(p, 123, 0, 1, 0, 0.1, 0)
        ft.restore_and_step_(p, g, m, None, found_inf, 123, 0, 1, 0, 0, 0.1, 0.1, 0.0, 0.9, 0.0,
                             False, False, 0.01, 1.0)
        return p

    with FakeTensorMode():
        args = [torch.empty(4096, device="cuda") for _ in range(3)] + [torch.zeros(1, device="cuda")]
    return make_fx(dispatch_functionalize(step), tracing_mode="fake")(*args).code


def run_aot_script(script: str, timeout: int) -> dict:
    """Run ``script`` (a test module whose __main__ compiles kernels ahead of time and prints
    a JSON report as its last line) in a subprocess without TRITON_INTERPRET; the report."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_CACHE_DIR", os.path.join(ROOT, "build", "triton_cache"))
    env["TRITON_CACHE_DIR"] = env["TRITON_CACHE_DIR"] + "_aot"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, os.path.abspath(script)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, f"AOT compile failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def report() -> dict:
    return run_aot_script(__file__, timeout=300)


def _names():
    names = []
    for dt in ("fp32", "bf16"):
        for cc in ARCHS:
            names.append(f"perturb/{dt}/sm{cc}")
            names += [f"restore_and_step[{v}]/{dt}/sm{cc}" for v in RS_VARIANTS
                      if v in (BF16_VARIANTS if dt == "bf16" else FP32_VARIANTS)]
    return names


@pytest.mark.parametrize("name", _names())
def test_no_spills(report, name):
    r = report[name]
    assert r["local"] == 0 and r["stack"] == 0, f"{name} spills: {r}"


@pytest.mark.parametrize("name", _names())
def test_register_bound(report, name):
    bound = REG_BOUND[name.split("[")[0].split("/")[0]]
    assert 0 < report[name]["regs"] <= bound, f"{name}: {report[name]['regs']} registers > {bound}"


@pytest.mark.parametrize("name", _names())
def test_128_bit_accesses(report, name):
    # Whole blocks load and store 4 x 32 bit per instruction (8 bf16 or 4 fp32 elements).
    r = report[name]
    assert r["ld_v4"] and r["st_v4"], f"{name}: no ld/st.global.v4 in the PTX: {r}"


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, ROOT)
    out = _compile_report()
    out["trace"] = _trace_report()
    print(json.dumps(out))


def test_ops_trace_into_triton_kernels(report):
    # torch.compile sees the kernels themselves (not an opaque custom op): one functional
    # Triton HOP per op, with the parameter among the tensors it writes.
    graph = report["trace"]
    assert graph.count("triton_kernel_wrapper_functional(") == 2, graph
    assert "fused_flat_triton" not in graph, graph
    assert graph.count("tensors_to_clone = ['param_ptr'") == 2, graph
