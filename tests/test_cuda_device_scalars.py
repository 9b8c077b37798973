"""Device-resident per-step scalars of the CUDA list ops (CUDA-graph capture, the optimizers'
``capturable=True``), checked without a GPU.

fused_flat.backends.cuda.perturb_ / restore_and_step_ and fused_flat.backends.cuda_sam.sam_restore_and_step_ /
sam_probe_ take ``step`` as a one-element int64 device tensor and ``lr`` / ``noise_std`` as a
one-element float64 (or float32) device tensor; the kernels read them from device memory.
Each pass is one call of a compiled list op (``torch.ops.fused_flat.*_list_``, the op set the
CPU backend calls too, with a CUDA kernel that builds its launch arguments by value). Here,
on fake CUDA tensors (FakeTensorMode: any host read of a device value raises
DataDependentOutputException), the wrappers must

  * trace with no host read, and call the ops with the tensors in their Tensor? arguments
    (step_t / lr_t / noise_std_t) and 0 in the scalar ones; stochastic_rounding reaches the
    list op (no per-tensor fallback) for 16-bit lists only;
  * reject a wrong dtype, size or device with a ValueError that says what to pass;
  * trace under make_fx (what torch.compile's AOT stage does) with the tensors as graph inputs
    and one node per pass.

The ops' schemas are checked too, and their CPU kernels against the number path (the same
schema takes the tensors on the CPU, read when the op runs). Numerical equality with the
scalar path on CUDA (bit for bit) needs a GPU: tests/test_cuda_gpu.py and
tests/test_cuda_sam_gpu.py.
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from fused_flat.backends import _native
from tests.helpers import RecordOps

pytestmark = pytest.mark.skipif(not (_native.available() and _native.cuda_built()),
                                reason="needs the extension built with its CUDA ops (fake kernels)")

SIZES = [1, 5, 4097, 3]
OFFSETS = [0, 7, 1 << 33, 4105]


def _lists(dtype, k):
    return [[torch.randn(n, device="cuda").to(dtype) for n in SIZES] for _ in range(k)]


def _scalars():
    """Device scalars without a known value (torch.empty): a host read cannot succeed."""
    return (torch.empty((), dtype=torch.int64, device="cuda"),
            torch.empty(1, dtype=torch.float64, device="cuda"),
            torch.empty((), dtype=torch.float64, device="cuda"))


def test_host_read_of_a_scalar_raises_under_the_mode():
    with FakeTensorMode():
        step_t, lr_t, _ = _scalars()
        with pytest.raises(DataDependentOutputException):
            int(step_t)
        with pytest.raises(DataDependentOutputException):
            float(lr_t)


@pytest.mark.parametrize("dtype,sr_reaches_op", [(torch.bfloat16, True), (torch.float16, True),
                                                 (torch.float32, False)])
def test_cuda_multi_tensor_scalars_trace_without_host_read(dtype, sr_reaches_op):
    from fused_flat.backends import cuda as cuda_multi

    with FakeTensorMode():
        ps, gs, ms = _lists(dtype, 3)
        step_t, lr_t, ns_t = _scalars()
        with RecordOps("fused_flat") as rec:
            cuda_multi.perturb_(ps, OFFSETS, 123, 2, step_t, 0, 0.01)
            cuda_multi.restore_and_step_(ps, gs, ms, OFFSETS, None, None, 123, 2, step_t, 0, 0.01,
                                         lr_t, 5e-4, 0.9, 0.0, False, False, ns_t, 1.0, True)
            # a Python float noise_std with tensor step and lr (the scheduler-only case)
            cuda_multi.restore_and_step_(ps, gs, None, OFFSETS, None, None, 123, 2, step_t, 0, 0.0,
                                         lr_t, 0.0, 0.0, 0.0, False, False, 0.0, 1.0)
    names = [c[0] for c in rec.calls]
    assert names == ["perturb_list_", "restore_and_step_list_", "restore_and_step_list_"], names
    per = rec.calls[0][1]
    assert per["step_t"] is step_t and per["step"] == 0 and per["sigma"] == 0.01
    st = rec.calls[1][1]
    assert st["step_t"] is step_t and st["lr_t"] is lr_t and st["noise_std_t"] is ns_t
    assert st["step"] == 0 and st["lr"] == 0.0 and st["noise_std"] == 0.0
    assert st["stochastic_rounding"] is sr_reaches_op
    st2 = rec.calls[2][1]
    assert st2["noise_std_t"] is None and st2["lr_t"] is lr_t and st2["moms"] == []


def test_cuda_multi_scalar_path_passes_no_tensors():
    from fused_flat.backends import cuda as cuda_multi

    with FakeTensorMode():
        ps, gs = _lists(torch.bfloat16, 2)
        with RecordOps("fused_flat") as rec:
            cuda_multi.perturb_(ps, OFFSETS, 123, 2, 7, 0, 0.01)
            cuda_multi.restore_and_step_(ps, gs, None, OFFSETS, None, None, 123, 2, 7, 0, 0.01,
                                         0.1, 0.0, 0.0, 0.0, False, False, 1e-3, 1.0, True)
    (_, per), (_, st) = rec.calls
    assert per["step"] == 7 and per["step_t"] is None
    assert st["step"] == 7 and st["lr"] == 0.1 and st["noise_std"] == 1e-3
    assert st["step_t"] is None and st["lr_t"] is None and st["noise_std_t"] is None
    assert st["stochastic_rounding"] is True   # the multi-tensor kernel, no per-tensor fallback


def test_cuda_multi_accepts_float32_scalars():
    from fused_flat.backends import cuda as cuda_multi

    with FakeTensorMode():
        ps, gs = _lists(torch.float32, 2)
        lr32 = torch.empty(1, dtype=torch.float32, device="cuda")
        with RecordOps("fused_flat") as rec:
            cuda_multi.restore_and_step_(ps, gs, None, OFFSETS, None, None, 1, 0, 3, 0, 0.0, lr32,
                                         0.0, 0.0, 0.0, False, False, lr32, 1.0)
    assert rec.calls[0][1]["lr_t"] is lr32 and rec.calls[0][1]["noise_std_t"] is lr32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_sam_tensor_scalars_trace_without_host_read(dtype):
    from fused_flat.backends import cuda_sam

    with FakeTensorMode():
        ps, bs, gs, ms = _lists(dtype, 4)
        step_t, lr_t, _ = _scalars()
        with RecordOps("fused_flat") as rec:
            cuda_sam.sam_restore_and_step_(ps, bs, gs, ms, None, None, lr_t, 5e-4, 0.9, 0.0, False,
                                           False, 1.0, True, 123, 2, step_t, OFFSETS)
            cuda_sam.sam_probe_(ps, bs, OFFSETS, 123, 2, step_t, 1e-3)
    (n1, st), (n2, pr) = rec.calls
    assert (n1, n2) == ("sam_restore_and_step_list_", "sam_probe_list_")
    assert st["lr_t"] is lr_t and st["step_t"] is step_t and st["lr"] == 0.0 and st["step"] == 0
    assert st["stochastic_rounding"] is (dtype == torch.bfloat16)
    assert pr["step_t"] is step_t and pr["step"] == 0


def _bad_scalars():
    """(argument, bad value maker, message fragment) for every validated scalar."""
    return [
        ("step", lambda: torch.empty((), dtype=torch.int32, device="cuda"), "one-element int64"),
        ("step", lambda: torch.empty(2, dtype=torch.int64, device="cuda"), "2 elements"),
        ("step", lambda: torch.empty((), dtype=torch.int64), "on cuda:0"),
        ("lr", lambda: torch.empty((), dtype=torch.float16, device="cuda"), "float64 or float32"),
        ("lr", lambda: torch.empty(3, dtype=torch.float64, device="cuda"), "3 elements"),
        ("lr", lambda: torch.empty((), dtype=torch.float64), "on cuda:0"),
        ("noise_std", lambda: torch.empty((), dtype=torch.int64, device="cuda"), "float64 or float32"),
    ]


@pytest.mark.parametrize("arg,make,msg", _bad_scalars())
def test_cuda_multi_rejects_bad_scalars(arg, make, msg):
    from fused_flat.backends import cuda as cuda_multi

    with FakeTensorMode():
        ps, gs = _lists(torch.float32, 2)
        kw = dict(step=3, lr=0.1, noise_std=0.0)
        kw[arg] = make()
        with pytest.raises(ValueError, match=f"restore_and_step_: {arg} must be a Python") as e:
            cuda_multi.restore_and_step_(ps, gs, None, OFFSETS, None, None, 1, 0, kw["step"], 0, 0.0,
                                         kw["lr"], 0.0, 0.0, 0.0, False, False, kw["noise_std"], 1.0)
        assert msg in str(e.value)
        if arg == "step":
            with pytest.raises(ValueError, match="perturb_: step must be"):
                cuda_multi.perturb_(ps, OFFSETS, 1, 0, kw["step"], 0, 0.1)


@pytest.mark.parametrize("arg,make,msg", [b for b in _bad_scalars() if b[0] != "noise_std"])
def test_cuda_sam_rejects_bad_scalars(arg, make, msg):
    from fused_flat.backends import cuda_sam

    with FakeTensorMode():
        ps, bs, gs = _lists(torch.bfloat16, 3)
        kw = dict(step=3, lr=0.1)
        kw[arg] = make()
        with pytest.raises(ValueError, match=f"sam_restore_and_step_: {arg} must be") as e:
            cuda_sam.sam_restore_and_step_(ps, bs, gs, None, None, None, kw["lr"], 0.0, 0.0, 0.0,
                                           False, False, 1.0, True, 1, 0, kw["step"], OFFSETS)
        assert msg in str(e.value)
        if arg == "step":
            with pytest.raises(ValueError, match="sam_probe_: step must be"):
                cuda_sam.sam_probe_(ps, bs, OFFSETS, 1, 0, kw["step"], 1e-3)


def test_make_fx_graph_takes_the_scalars_as_inputs():
    """What torch.compile's AOT stage sees: the ops in the graph, the scalars graph inputs."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from fused_flat.backends import cuda as cuda_multi
    from fused_flat.backends import cuda_sam

    def step(p, g, m, b, step_t, lr_t, ns_t):
        cuda_multi.perturb_([p], [5], 123, 0, step_t, 0, 0.1)
        cuda_multi.restore_and_step_([p], [g], [m], [5], None, None, 123, 0, step_t, 0, 0.1, lr_t,
                                     0.0, 0.9, 0.0, False, False, ns_t, 1.0, True)
        cuda_sam.sam_restore_and_step_([p], [b], [g], None, None, None, lr_t, 0.0, 0.0, 0.0,
                                       False, False, 1.0, True, 123, 0, step_t, [5])
        cuda_sam.sam_probe_([p], [b], [5], 123, 0, step_t, 1e-3)
        return p

    with FakeTensorMode():
        args = [torch.empty(4096, dtype=torch.bfloat16, device="cuda") for _ in range(4)]
        args += list(_scalars())
    gm = make_fx(step, tracing_mode="fake")(*args)
    code = gm.code
    for op in ("perturb_list_", "restore_and_step_list_", "sam_restore_and_step_list_",
               "sam_probe_list_"):
        assert code.count(f"fused_flat.{op}.default(") == 1, code   # one node per pass
    assert code.count("fused_flat.") == 4, code   # nothing else
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    users = {n.name: {u.target for u in n.users} for n in gm.graph.nodes if n.op == "placeholder"}
    step_in, lr_in, ns_in = placeholders[4:7]
    targets = {str(t) for t in users[step_in]}
    assert any("perturb_list_" in t for t in targets) and any("sam_probe_list_" in t for t in targets)
    assert any("restore_and_step_list_" in str(t) for t in users[lr_in])
    assert any("restore_and_step_list_" in str(t) for t in users[ns_in])


def test_op_schemas():
    ops = torch.ops.fused_flat
    want = {
        "perturb_list_": "float sigma, Tensor? layout=None, Tensor? step_t=None) -> ()",
        "restore_and_step_list_": "bool stochastic_rounding=False, Tensor? layout=None, "
                                  "Tensor? step_t=None, Tensor? lr_t=None, "
                                  "Tensor? noise_std_t=None) -> ()",
        "sam_perturb_list_": "Tensor? layout=None, Tensor? coef_tensor=None) -> ()",
        "sam_restore_and_step_list_": "Tensor? layout=None, Tensor? lr_t=None, "
                                      "Tensor? step_t=None) -> ()",
        "sam_probe_list_": "float delta, Tensor? step_t=None) -> ()",
    }
    for name, tail in want.items():
        schema = str(getattr(ops, name).default._schema)
        assert schema.endswith(tail), schema
    for gone in ("perturb_multi_", "restore_and_step_multi_", "all_finite_multi",
                 "sam_grad_sq_norm_multi", "sam_perturb_multi_", "sam_restore_and_step_multi_",
                 "sam_probe_multi_"):
        assert not hasattr(ops, gone), gone


def test_cpu_kernels_read_the_scalar_tensors():
    """The same schemas on CPU tensors: a tensor step / lr / noise_std / coef gives the bits of
    the number it holds (float32 tensors widened, as float() would)."""
    ops = torch.ops.fused_flat
    torch.manual_seed(0)
    base = [torch.randn(n) for n in SIZES]
    grads = [torch.randn(n) for n in SIZES]
    moms = [torch.randn(n) for n in SIZES]
    lr32 = torch.tensor([0.1], dtype=torch.float32)

    def run(tensors: bool):
        ps, ms = [p.clone() for p in base], [m.clone() for m in moms]
        bs = [torch.empty_like(p) for p in ps]
        st = torch.tensor(7)
        if tensors:
            ops.perturb_list_(ps, OFFSETS, 123, 2, 0, 0, 0.01, None, st)
            ops.restore_and_step_list_(ps, grads, ms, OFFSETS, None, None, 123, 2, 0, 0, 0.01,
                                       0.0, 5e-4, 0.9, 0.0, False, False, 0.0, 1.0, False, None,
                                       st, lr32, torch.tensor(1e-3, dtype=torch.float64))
            ops.sam_perturb_list_(ps, grads, bs, True, 0.0, 0.01, None,
                                  torch.tensor([0.05], dtype=torch.float64))
            ops.sam_restore_and_step_list_(ps, bs, grads, ms, None, None, 0.0, 0.0, 0.9, 0.0,
                                           False, False, 1.0, False, 1, 0, 0, OFFSETS, None,
                                           lr32, st)
            ops.sam_probe_list_(ps, bs, OFFSETS, 123, 2, 0, 1e-3, st)
        else:
            ops.perturb_list_(ps, OFFSETS, 123, 2, 7, 0, 0.01)
            ops.restore_and_step_list_(ps, grads, ms, OFFSETS, None, None, 123, 2, 7, 0, 0.01,
                                       float(lr32), 5e-4, 0.9, 0.0, False, False, 1e-3, 1.0)
            ops.sam_perturb_list_(ps, grads, bs, True, 0.05, 0.01)
            ops.sam_restore_and_step_list_(ps, bs, grads, ms, None, None, float(lr32), 0.0, 0.9,
                                           0.0, False, False, 1.0, False, 1, 0, 7, OFFSETS)
            ops.sam_probe_list_(ps, bs, OFFSETS, 123, 2, 7, 1e-3)
        return ps + ms + bs

    for got, want in zip(run(True), run(False)):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="step_t must be a one-element Long tensor on cpu"):
        ops.perturb_list_(base, OFFSETS, 1, 0, 0, 0, 0.1, None, torch.tensor(1.0))
