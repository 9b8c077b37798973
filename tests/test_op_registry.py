"""The op registry of the compiled backends: one op set for CPU and CUDA.

fused_flat.backends.cpp.LIST_OPS names the ops the compiled backends' passes call on both
devices (schemas csrc/bindings.cpp and csrc/sam_ops.cpp), CPU_OPS the ones the 'cpp'
backend alone calls (the step-plan ops, CPU only by design). Checked here:

* every op has a kernel for the CPU dispatch key, and every list op one for CUDA when the
  extension was built with CUDA (fused_flat.backends._native.cuda_built());
* every op has a fake (abstract) implementation;
* the lists are the truth: an optimizer step of every optimizer on the 'cpp' backend (real
  CPU tensors) and on the 'cuda' backend (fake CUDA tensors) reaches only ops listed there;
* torch.library.opcheck (schema mutation annotations, fake vs real outputs, autograd
  registration, AOT dispatch) of every op on CPU tensors; the CUDA cases run on a GPU.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from fused_flat.backends import _native
from tests.test_no_host_sync import OPTIMIZERS   # every optimizer and configuration

pytestmark = pytest.mark.skipif(not _native.available(), reason="needs the compiled extension")

if _native.available():
    from fused_flat.backends import cpp, cpp_sam  # noqa: F401  (fake implementations)

    LIST_OPS = cpp.LIST_OPS
    CPU_OPS = cpp.CPU_OPS
else:
    LIST_OPS = CPU_OPS = ()

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


def _has_kernel(op: str, key: str) -> bool:
    """A kernel registered for ``key``; for CPU one for every backend counts too
    (plan_layout: CompositeExplicitAutograd)."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    name = f"fused_flat::{op}"
    return has(name, key) or (key == "CPU" and has(name, "CompositeExplicitAutograd"))


def _has_fake(op: str) -> bool:
    entry = torch._library.simple_registry.singleton.find(f"fused_flat::{op}")
    return entry.fake_impl.kernel is not None


@pytest.mark.parametrize("op", LIST_OPS + CPU_OPS)
def test_every_op_has_its_kernels_and_a_fake(op):
    assert _has_kernel(op, "CPU"), f"fused_flat::{op} has no CPU kernel"
    assert _has_fake(op), f"fused_flat::{op} has no fake implementation"
    if op in LIST_OPS and _native.cuda_built():
        assert _has_kernel(op, "CUDA"), f"fused_flat::{op} has no CUDA kernel"


def test_the_multi_ops_are_gone():
    names = [n for n in dir(torch.ops.fused_flat) if n.endswith("_multi") or n.endswith("_multi_")]
    assert names == []


class _Record(TorchDispatchMode):
    """The fused_flat ops that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fused_flat":
            self.ops.add(func._schema.name.split("::")[1])
        return func(*args, **(kwargs or {}))


def _model(device):
    return nn.Sequential(nn.Linear(6, 8, device=device), nn.Tanh(), nn.Linear(8, 3, device=device))


def _step(name, opt, model, device):
    """One step of optimizer `name` (tests/test_no_host_sync.py's driver, on any device): the
    gradients written by hand, as backward would leave them."""
    def backward():
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        return torch.zeros((), device=device)

    if name.startswith(("SGLD", "FSGLD", "RWP")):
        opt.step(backward)
    elif name == "MSAM":
        opt.step(lambda mb: backward(), torch.randn(4, 6, device=device))
    elif name == "RWSAM":
        b, be = opt.buckets()[0], opt._backends[0]
        ps = [p.data.view(-1) for p in b.params]
        be.sam_probe_(ps, [torch.empty_like(p) for p in ps], [b.index(j) for j in range(len(ps))],
                      opt.seed, b.bucket_id, opt._step_arg(be), 1e-3)
        backward()
        opt.first_step(zero_grad=True)
        backward()
        opt.second_step()
    else:
        backward()
        opt.step(backward)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_cpp_backend_calls_only_listed_ops(name):
    model = _model("cpu")
    opt = OPTIMIZERS[name](model.parameters(), dict(seed=1, backend="cpp"))
    with _Record() as rec:
        for _ in range(2):
            _step(name, opt, model, "cpu")
    assert rec.ops, "the step reached no compiled op"
    assert rec.ops <= set(LIST_OPS + CPU_OPS), sorted(rec.ops - set(LIST_OPS + CPU_OPS))


@pytest.mark.skipif(not (_native.available() and _native.cuda_built()),
                    reason="needs the extension built with its CUDA ops")
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_cuda_backend_calls_only_list_ops(name):
    with FakeTensorMode():
        model = _model("cuda")
        opt = OPTIMIZERS[name](model.parameters(), dict(seed=1, backend="cuda"))
        with _Record() as rec:
            for _ in range(2):
                _step(name, opt, model, "cuda")
    assert rec.ops and rec.ops <= set(LIST_OPS), sorted(rec.ops)


# ------------------------------------------------------------------ opcheck
SIZES = [5, 0, 4097, 3]
OFFSETS = [1, 9, 10, (1 << 33) + 2]


def _lst(device, dtype=torch.float32, sizes=SIZES):
    return [torch.randn(n, dtype=dtype, device=device) for n in sizes]


def _cases(device):
    """(op name, args) samples: every listed op on `device` (CPU_OPS: CPU only)."""
    d = device
    one = lambda v, dt: torch.tensor([v], dtype=dt, device=d)   # noqa: E731
    ps, gs, ms, bs = _lst(d), _lst(d), _lst(d), _lst(d)
    h16 = _lst(d, torch.bfloat16)
    out = [
        ("perturb_list_", (ps, OFFSETS, 3, 1, 7, 0, 0.1)),
        ("perturb_list_", (ps, OFFSETS, 3, 1, 0, 0, 0.1, None, one(7, torch.int64))),
        ("restore_and_step_list_", (ps, gs, ms, OFFSETS, None, None, 3, 1, 7, 0, 0.1, 0.1, 5e-4,
                                    0.9, 0.0, False, False, 1e-3, 1.0)),
        ("restore_and_step_list_", (h16, _lst(d, torch.bfloat16), [], OFFSETS,
                                    one(2.0, torch.float32), one(0.0, torch.float32), 3, 1, 0, 0,
                                    0.1, 0.0, 0.0, 0.0, 0.0, False, False, 0.0, 1.0, True, None,
                                    one(7, torch.int64), one(0.1, torch.float64),
                                    one(1e-3, torch.float32))),
        ("all_finite", (gs,)),
        ("sam_grad_sq_norm_list", (gs, ps, True, 0.01)),
        ("sam_grad_sq_norm_list", (gs, [], False, 0.0)),
        ("sam_perturb_list_", (ps, gs, bs, False, 0.05, 0.0)),
        ("sam_perturb_list_", (ps, gs, bs, True, 0.0, 0.01, None, one(0.05, torch.float64))),
        ("sam_restore_and_step_list_", (ps, bs, gs, ms, None, None, 0.1, 5e-4, 0.9, 0.0, False,
                                        False, 1.0)),
        ("sam_restore_and_step_list_", (h16, _lst(d, torch.bfloat16), _lst(d, torch.bfloat16), [],
                                        None, one(1.0, torch.float32), 0.0, 0.0, 0.0, 0.0, False,
                                        False, 1.0, True, 3, 1, 0, OFFSETS, None,
                                        one(0.1, torch.float32), one(7, torch.int64))),
        ("sam_probe_list_", (ps, bs, OFFSETS, 3, 1, 7, 1e-3)),
        ("sam_probe_list_", (ps, bs, OFFSETS, 3, 1, 0, 1e-3, one(7, torch.int64))),
        ("perturb_from_", (torch.randn(9, device=d).to(torch.bfloat16), torch.randn(9, device=d),
                           3, 1, 7, 0, 0.1, 5)),
    ]
    if device == "cpu":
        users = [torch.randn(3, 4), torch.randn(5)]
        layout = torch.ops.fused_flat.plan_layout(users)
        out += [
            ("restore_check_list_", (ps, gs, OFFSETS, 3, 1, 7, 0, -0.1)),
            ("plan_layout", (users,)),
            ("check_step_list", (users, layout, [torch.randn(3, 4), None],
                                 torch.tensor([True, False]), True)),
        ]
    return out


def test_every_listed_op_has_an_opcheck_case():
    names = {n for n, _ in _cases("cpu")}
    assert names == set(LIST_OPS + CPU_OPS), sorted(set(LIST_OPS + CPU_OPS) ^ names)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for name, args in _cases(device):
        op = getattr(torch.ops.fused_flat, name).default
        if name == "check_step_list":
            # its fake cannot know has_grad's contents; schema and fake vs real only
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
            continue
        torch.library.opcheck(op, args)
