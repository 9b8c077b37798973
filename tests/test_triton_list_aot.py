"""Static GPU checks of the Triton kernels without a GPU (every pass is a multi-tensor list
kernel: fused_flat/backends/triton/multi.py, fused_flat/backends/triton/sam.py): ahead-of-time
compile for sm_80 and sm_90 of the plain variants and of those that stochastic rounding, the
perturbation from fp32 masters and the device-resident step / lr / noise_std (STEP_PTR,
LR_PTR, NOISE_STD_PTR) add, and assert no register spills, a register bound and 128-bit
accesses on whole blocks. Also: the per-step scalar arguments (step counter, lr, noise_std, tags,
momentum_init) never change the kernel's specialization, i.e. a new step never recompiles
(checked with Triton's own argument binder for the sm_90 target).

The compile runs in a subprocess (this file run as a script) with TRITON_INTERPRET unset
(conftest.py switches the interpreter on for the session). What it cannot show: speed or
a GPU's numbers; a run on a GPU does.
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
REG_BOUND = 128
_I64 = "*i64"


def _ml_rs_sig(dt, scalar_ptr_dt="fp64"):
    sig = {"chunks_ptr": _I64, "meta_ptr": _I64, "ptrs_ptr": _I64, "T": "i32", "carrier": f"*{dt}",
           "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32", "step_ptr": _I64,
           "lr_ptr": f"*{scalar_ptr_dt}", "noise_std_ptr": f"*{scalar_ptr_dt}", "key": "i64", "bw": "i32",
           "step_lo": "i64", "restore_tag": "i32"}
    sig.update({s: "fp32" for s in ("sigma", "lr", "weight_decay", "momentum", "dampening",
                                    "noise_std", "grad_mult")})
    sig["momentum_init"] = "i32"
    return sig


ML_RS = {
    # name: (dtype, constexprs)
    "scalars": ("fp32", dict(SR=False, STEP_PTR=False, LR_PTR=False, NOISE_STD_PTR=False)),
    "device_scalars": ("fp32", dict(SR=False, STEP_PTR=True, LR_PTR=True, NOISE_STD_PTR=True)),
    "sr_bf16": ("bf16", dict(SR=True, EPS_TAG0=True, IS_BF16=True, STEP_PTR=True, LR_PTR=True,
                             NOISE_STD_PTR=True)),
    "sr_bf16_tag7": ("bf16", dict(SR=True, EPS_TAG0=False, IS_BF16=True)),
    "sr_fp16": ("fp16", dict(SR=True, EPS_TAG0=True, IS_BF16=False, STEP_PTR=True, LR_PTR=True,
                             NOISE_STD_PTR=True)),
}


def _compile_report() -> dict:
    import triton
    import triton.backends.nvidia as nv
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fused_flat.backends.triton import multi, sam

    cuobjdump = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")

    def build(fn, sig, const, cc):
        names = list(sig)
        const = dict(const)
        sig = dict(sig)
        sig.update({c: "constexpr" for c in const})
        attrs = {(names.index(p),): [["tt.divisibility", 16]] for p in names
                 if sig[p].startswith("*")}
        k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", cc, 32),
                           options={"num_warps": 4})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True,
                                 text=True, check=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
        if m is None:
            raise RuntimeError(f"cannot parse cuobjdump -res-usage output:\n{res}")
        ptx = k.asm["ptx"]
        return dict(regs=int(m[1]), stack=int(m[2]), local=int(m[4]),
                    ld_v4=bool(re.search(r"ld\.global(\.\w+)*\.v4", ptx)),
                    st_v4=bool(re.search(r"st\.global(\.\w+)*\.v4", ptx)))

    tables = dict(ALIGNED=True, CHUNK=16 * 1024, BLOCK=1024)
    out = {}
    for cc in ARCHS:
        for name, (dt, flags) in ML_RS.items():
            const = dict(HAS_MOM=True, NESTEROV=True, NEED_EPS=True, NEED_XI=True,
                         HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, STEP_PTR=False, LR_PTR=False,
                         NOISE_STD_PTR=False, SR=False, EPS_TAG0=False, IS_BF16=False)
            const.update(flags)
            const.update(tables)
            out[f"multi.restore_and_step[{name}]/sm{cc}"] = build(
                multi.restore_and_step_kernel, _ml_rs_sig(dt), const, cc)
        for step_ptr in (False, True):
            sig = {"chunks_ptr": _I64, "meta_ptr": _I64, "ptrs_ptr": _I64, "T": "i32",
                   "carrier": "*fp32", "step_ptr": _I64, "key": "i64", "bw": "i32", "step_lo": "i64",
                   "tag": "i32", "sigma": "fp32"}
            out[f"multi.perturb[step_ptr={step_ptr}]/sm{cc}"] = build(
                multi.perturb_kernel, sig, dict(STEP_PTR=step_ptr, **tables), cc)
        for dt, sr in (("fp32", False), ("bf16", True), ("fp16", True)):
            sig = {"chunks_ptr": _I64, "meta_ptr": _I64, "ptrs_ptr": _I64, "T": "i32",
                   "carrier": f"*{dt}", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
                   "lr_ptr": "*fp64", "step_ptr": _I64, "lr": "fp32", "weight_decay": "fp32",
                   "momentum": "fp32", "dampening": "fp32", "grad_mult": "fp32",
                   "momentum_init": "i32", "key": "i64", "bw": "i32", "step_lo": "i64"}
            const = dict(HAS_MOM=True, NESTEROV=True, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True,
                         SR=sr, IS_BF16=dt == "bf16", OFF4=True, LR_PTR=True, STEP_PTR=sr,
                         **tables)
            out[f"sam.restore_and_step[{dt}]/sm{cc}"] = build(sam.restore_and_step_kernel, sig,
                                                              const, cc)
        for dt in ("bf16", "fp16"):
            sig = {"chunks_ptr": _I64, "meta_ptr": _I64, "ptrs_ptr": _I64, "T": "i32",
                   "carrier": f"*{dt}", "master_carrier": "*fp32", "step_ptr": _I64,
                   "key": "i64", "bw": "i32", "step_lo": "i64", "tag": "i32", "sigma": "fp32"}
            out[f"multi.perturb_from[{dt}]/sm{cc}"] = build(
                multi.perturb_from_kernel, sig,
                dict(NEED_EPS=True, IS_BF16=dt == "bf16", STEP_PTR=False, **tables), cc)
        sig = {"chunks_ptr": _I64, "meta_ptr": _I64, "ptrs_ptr": _I64, "T": "i32",
               "carrier": "*bf16", "step_ptr": _I64, "key": "i64", "bw": "i32", "step_lo": "i64",
               "delta": "fp32"}
        out[f"sam.probe[step_ptr]/sm{cc}"] = build(sam.probe_kernel, sig,
                                                   dict(STEP_PTR=True, **tables), cc)
    return out


def _specialization_report() -> dict:
    """{kernel: True} when two calls that differ only in per-step scalars (step, lr,
    noise_std, tags, momentum_init, delta) bind to the same specialization (no recompile)."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from fused_flat.backends.triton import multi, sam

    backend = make_backend(GPUTarget("cuda", 90, 32))
    p = torch.zeros(64)
    tables = dict(ALIGNED=True, CHUNK=16 * 1024, BLOCK=1024)

    def spec(kernel, args, kw):
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        return repr(binder(*args, **kw)[1])

    out = {}
    # step_lo values: 1, a multiple of 16, an odd one (all < 2^31: one type)
    steps = [(1, 0.1, 1, 0, 1), (16, 0.25, 0, 16, 32), (12345, 1.0 / 3, 1, 7, 3)]
    BW = 3 << 8   # the bucket word (noise_key) of bucket 3
    rs_kw = dict(HAS_MOM=True, NESTEROV=False, NEED_EPS=True, NEED_XI=True,
                 HAS_GRAD_SCALE=False, HAS_FOUND_INF=False, STEP_PTR=False, LR_PTR=False,
                 NOISE_STD_PTR=False, SR=True, EPS_TAG0=True, IS_BF16=True, **tables)
    out["multi.restore_and_step"] = len({spec(
        multi.restore_and_step_kernel,
        (p, p, p, 3, p, p, p, p, p, p, 0x12345678, BW, s, tag, 0.1, lr, 0.0, 0.9, 0.0,
         lr / 100, 1.0, mi), rs_kw) for s, lr, mi, tag, _ in steps}) == 1
    out["multi.perturb"] = len({spec(multi.perturb_kernel,
                                     (p, p, p, 3, p, p, 0x12345678, BW, s, tag, lr),
                                     dict(STEP_PTR=False, **tables))
                                for s, lr, _, tag, _ in steps}) == 1
    out["multi.perturb_from"] = len({spec(multi.perturb_from_kernel,
                                          (p, p, p, 3, p, p, p, 0x12345678, BW, s, tag, lr),
                                          dict(NEED_EPS=True, IS_BF16=False, STEP_PTR=False,
                                               **tables))
                                     for s, lr, _, tag, _ in steps}) == 1
    sam_kw = dict(HAS_MOM=True, NESTEROV=False, HAS_GRAD_SCALE=False, HAS_FOUND_INF=False,
                  SR=True, IS_BF16=True, OFF4=True, LR_PTR=False, STEP_PTR=False, **tables)
    out["sam.restore_and_step"] = len({spec(
        sam.restore_and_step_kernel,
        (p, p, p, 3, p, p, p, p, p, lr, 0.0, 0.9, 0.0, 1.0, mi),
        dict(sam_kw, key=0x12345678, bw=BW, step_lo=s)) for s, lr, mi, _, _ in steps}) == 1
    out["sam.probe"] = len({spec(sam.probe_kernel, (p, p, p, 3, p, p, 0x12345678, BW, s, lr),
                                 dict(STEP_PTR=False, **tables))
                            for s, lr, _, _, _ in steps}) == 1
    return out


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
    return run_aot_script(__file__, timeout=600)


def _names():
    names = []
    for cc in ARCHS:
        names += [f"multi.restore_and_step[{v}]/sm{cc}" for v in ML_RS]
        names += [f"multi.perturb[step_ptr={s}]/sm{cc}" for s in (False, True)]
        names += [f"multi.perturb_from[{dt}]/sm{cc}" for dt in ("bf16", "fp16")]
        names += [f"sam.restore_and_step[{dt}]/sm{cc}" for dt in ("fp32", "bf16", "fp16")]
        names.append(f"sam.probe[step_ptr]/sm{cc}")
    return names


@pytest.mark.parametrize("name", _names())
def test_no_spills_and_register_bound(report, name):
    r = report["compile"][name]
    assert r["local"] == 0 and r["stack"] == 0, f"{name} spills: {r}"
    assert 0 < r["regs"] <= REG_BOUND, f"{name}: {r['regs']} registers > {REG_BOUND}"


@pytest.mark.parametrize("name", _names())
def test_128_bit_accesses(report, name):
    r = report["compile"][name]
    assert r["ld_v4"] and r["st_v4"], f"{name}: no ld/st.global.v4 in the PTX: {r}"


@pytest.mark.parametrize("kernel", ["multi.restore_and_step", "multi.perturb",
                                    "multi.perturb_from", "sam.restore_and_step", "sam.probe"])
def test_per_step_scalars_do_not_recompile(report, kernel):
    assert report["specialization"][kernel], f"{kernel}: a per-step scalar changes the key"


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, ROOT)
    print(json.dumps({"specialization": _specialization_report(), "compile": _compile_report()}))
