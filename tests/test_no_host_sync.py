"""No host synchronization in any optimizer step on CUDA tensors, proven without a GPU:
every step runs on fake CUDA tensors (torch._subclasses.FakeTensorMode), where any read of
a device value on the host (``.item()``, ``bool(t)``, ``float(t)``) raises.

The matrix: every optimizer x {the default backend, 'triton', 'cuda'} x capturable {False,
True}, three steps each, with NEW gradient tensors every step (``zero_grad(set_to_none=True)``
and fresh ``.grad`` tensors, as backward leaves them): the case that used to rebuild launch
tables on the host and copy them from pageable memory. Each multi-tensor pass is one
registered op whose fake implementation runs here, and the test checks that the step went
through the list ops of the backend it names (no silent fallback to another path).

What fake tensors cannot cover: the ops' real implementations -- Triton's launch tables
(built on the host, copied from pinned memory without a sync;
fused_flat/backends/multi_tensor.py), and the 'cuda' backend's launch arguments, which the
compiled list ops' CUDA implementations build in C++ and pass by value in the kernels'
argument blocks (csrc/cuda/list_launch.h): fake tensors replace those implementations. They
run on a GPU in tests/test_gpu_sync.py (``make gpu-check``) under
torch.cuda.set_sync_debug_mode("error").

Without a CUDA driver the autograd engine cannot run backward on fake CUDA tensors, so the
closures write gradients by hand (what backward would leave in ``p.grad``); RW-SAM's step
runs a backward of its own, so its passes are checked one by one."""
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import fused_flat
from fused_flat import backends
from fused_flat.backends import _native


def _available(name):
    try:
        backends.get(name)
        return True
    except RuntimeError:
        return False


HAS_CUDA_OPS = _native.available() and _native.cuda_built()
HAS_TRITON = _available("triton")
# the registered ops a backend's passes go through (fused_flat/backends/triton: its own; 'cuda':
# the compiled list ops, the CPU backend's op set)
NAMESPACE = {"triton": "fused_flat_triton", "cuda": "fused_flat",
             "auto": "fused_flat_triton" if HAS_TRITON else "fused_flat"}
BACKENDS = [
    pytest.param("auto", marks=pytest.mark.skipif(not (HAS_TRITON or HAS_CUDA_OPS),
                                                  reason="no GPU backend (Triton, CUDA ops)")),
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")),
    pytest.param("cuda", marks=pytest.mark.skipif(
        not HAS_CUDA_OPS, reason="needs the extension built with its CUDA ops")),
]


class _Ops(TorchDispatchMode):
    """Counts the fused_flat ops (any namespace) that reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace.startswith("fused_flat"):
            self.names.append(f"{func.namespace}::{func._schema.name.split('::')[1]}")
        return func(*args, **(kwargs or {}))


def _model():
    return nn.Sequential(nn.Linear(6, 8, device="cuda"), nn.Tanh(), nn.Linear(8, 3, device="cuda"))


def _backward(model):
    """What loss.backward() leaves: a gradient per parameter; returns a (fake) loss."""
    for p in model.parameters():
        g = torch.randn_like(p)
        p.grad = g if p.grad is None else p.grad.add_(g)
    return torch.zeros((), device="cuda")


OPTIMIZERS = {
    "SGLD": lambda ps, kw: fused_flat.SGLD(ps, lr=0.1, beta=1e4, momentum=0.9, **kw),
    "FSGLD": lambda ps, kw: fused_flat.FSGLD(ps, lr=0.1, beta=1e4, momentum=0.9, **kw),
    "FSGLD-n2": lambda ps, kw: fused_flat.FSGLD(ps, lr=0.1, beta=1e4, n_perturbations=2, **kw),
    "FSGLD-exact": lambda ps, kw: fused_flat.FSGLD(ps, lr=0.1, beta=1e4, exact_restore=True, **kw),
    "RWP": lambda ps, kw: fused_flat.RWP(ps, lr=0.1, sigma=0.01, momentum=0.9, **kw),
    "SAM": lambda ps, kw: fused_flat.SAM(ps, lr=0.1, momentum=0.9, **kw),
    "ASAM": lambda ps, kw: fused_flat.SAM(ps, lr=0.1, adaptive=True, **kw),
    "USAM": lambda ps, kw: fused_flat.SAM(ps, lr=0.1, normalize=False, momentum=0.9, **kw),
    "MSAM": lambda ps, kw: fused_flat.MSAM(ps, lr=0.1, micro_batch_size=2, **kw),
    "RWSAM": lambda ps, kw: fused_flat.RWSAM(ps, lr=0.1, delta=1e-3, **kw),
}


def _step(name, opt, model):
    """One optimizer step with new gradient tensors (set_to_none=True, fresh .grad)."""
    if name.startswith(("SGLD", "FSGLD", "RWP")):
        def closure():
            opt.zero_grad(set_to_none=True)
            return _backward(model)
        opt.step(closure)
    elif name == "MSAM":
        opt.zero_grad(set_to_none=True)
        opt.step(lambda mb: _backward(model), torch.randn(4, 6, device="cuda"))
    elif name == "RWSAM":
        # RWSAM.step runs a backward of its own: its passes one by one (probe, then SAM's)
        b = opt.buckets()[0]
        be = opt._backends[0]
        ps = [p.data.view(-1) for p in b.params]
        bk = [torch.empty_like(p) for p in ps]
        be.sam_probe_(ps, bk, [b.index(j) for j in range(len(ps))], opt.seed, b.bucket_id,
                      opt._step_arg(be), 1e-3)
        w = opt.sample_weights(torch.rand(5, device="cuda"), torch.rand(5, device="cuda"))
        assert w.shape == (5,)
        opt.zero_grad(set_to_none=True)
        _backward(model)
        opt.first_step(zero_grad=True)
        _backward(model)
        opt.second_step()
    else:
        opt.zero_grad(set_to_none=True)
        _backward(model)
        opt.step(lambda: _backward(model))


@pytest.mark.parametrize("capturable", [False, True], ids=["eager", "capturable"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_makes_no_host_read_on_cuda_tensors(name, backend, capturable):
    with FakeTensorMode():
        model = _model()
        kw = dict(seed=1, capturable=capturable)
        if backend != "auto":
            kw["backend"] = backend
        opt = OPTIMIZERS[name](list(model.parameters()), kw)
        lr = None
        if capturable:
            # a device lr, set after construction (torch.optim.SGD's constructor checks
            # `lr < 0`, a host read, once: fine on a GPU, refused by the fake mode)
            lr = torch.tensor(0.1, device="cuda")
            for g in opt.param_groups:
                g["lr"] = lr
        grads = []
        with _Ops() as ops:
            for _ in range(3):
                _step(name, opt, model)
                grads.append([p.grad for p in model.parameters()])
                if lr is not None:
                    lr.mul_(0.5)   # what a scheduler does to a tensor lr: in place, on the device
        # new gradient tensors every step
        assert all(a is not b for s0, s1 in zip(grads, grads[1:]) for a, b in zip(s0, s1))
        if name != "RWSAM":
            if capturable:
                with pytest.raises(Exception):   # the counter is on the device: a host read
                    opt.step_count
            else:
                assert opt.step_count == 3
        with pytest.raises(Exception):   # the mode does catch host reads
            bool(next(model.parameters()).sum() > 0)
    want = NAMESPACE[backend]
    used = {n.split("::")[0] for n in ops.names}
    assert used == {want}, (want, sorted(set(ops.names)))
    update = "sam_restore_and_step_list_" if name in ("SAM", "ASAM", "USAM", "MSAM", "RWSAM") \
        else "restore_and_step_list_"
    assert ops.names.count(f"{want}::{update}") == 3, ops.names   # one fused update per step


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_step_makes_no_host_read(backend):
    """GradScaler hands found_inf / grad_scale as device tensors; the kernels read them."""
    with FakeTensorMode():
        model = _model()
        kw = dict(seed=1) if backend == "auto" else dict(seed=1, backend=backend)
        opt = fused_flat.FSGLD(model.parameters(), lr=0.1, beta=1e4, **kw)
        opt.perturb()
        _backward(model)
        opt.grad_scale = torch.ones((), device="cuda")
        opt.found_inf = torch.zeros((), device="cuda")
        opt.step()
        del opt.grad_scale, opt.found_inf
        assert opt.step_count == 1
