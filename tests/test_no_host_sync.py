"""No host synchronization in any optimizer step on CUDA tensors, proven without a GPU:
every step runs on fake CUDA tensors (torch._subclasses.FakeTensorMode), where any read of
a device value on the host (``.item()``, ``bool(t)``, ``float(t)``) raises.

Without a CUDA driver the autograd engine cannot run backward on fake CUDA tensors, so the
closures write gradients by hand (what backward would leave in ``p.grad``); RW-SAM's step
runs a backward of its own, so its passes are checked one by one."""
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import fused_flat
from fused_flat import _native

pytestmark = pytest.mark.skipif(not (_native.available() and _native.cuda_built()),
                                reason="needs the extension built with its CUDA ops (fake kernels)")


def _model():
    return nn.Sequential(nn.Linear(6, 8, device="cuda"), nn.Tanh(), nn.Linear(8, 3, device="cuda"))


def _backward(model):
    """What loss.backward() leaves: a gradient per parameter; returns a (fake) loss."""
    for p in model.parameters():
        g = torch.randn_like(p)
        p.grad = g if p.grad is None else p.grad.add_(g)
    return torch.zeros((), device="cuda")


CASES = {
    "SGLD": lambda ps: fused_flat.SGLD(ps, lr=0.1, beta=1e4, momentum=0.9, seed=1, backend="cuda"),
    "FSGLD": lambda ps: fused_flat.FSGLD(ps, lr=0.1, beta=1e4, momentum=0.9, seed=1, backend="cuda"),
    "FSGLD-n2": lambda ps: fused_flat.FSGLD(ps, lr=0.1, beta=1e4, n_perturbations=2, seed=1, backend="cuda"),
    "FSGLD-exact": lambda ps: fused_flat.FSGLD(ps, lr=0.1, beta=1e4, exact_restore=True, seed=1, backend="cuda"),
    "RWP": lambda ps: fused_flat.RWP(ps, lr=0.1, sigma=0.01, momentum=0.9, seed=1, backend="cuda"),
    "SAM": lambda ps: fused_flat.SAM(ps, lr=0.1, momentum=0.9, seed=1, backend="cuda"),
    "ASAM": lambda ps: fused_flat.SAM(ps, lr=0.1, adaptive=True, seed=1, backend="cuda"),
    "MSAM": lambda ps: fused_flat.MSAM(ps, lr=0.1, micro_batch_size=2, seed=1, backend="cuda"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_step_makes_no_host_read_on_cuda_tensors(name):
    with FakeTensorMode():
        model = _model()
        opt = CASES[name](list(model.parameters()))
        for _ in range(3):
            if name.startswith(("SGLD", "FSGLD", "RWP")):
                def closure():
                    opt.zero_grad()
                    return _backward(model)
                opt.step(closure)
            elif name == "MSAM":
                x = torch.randn(4, 6, device="cuda")
                opt.step(lambda mb: _backward(model), x)
            else:
                opt.zero_grad()
                _backward(model)
                opt.step(lambda: _backward(model))
        assert opt.step_count == 3
        with pytest.raises(Exception):   # the mode does catch host reads
            bool(next(model.parameters()).sum() > 0)


def test_grad_scaler_step_makes_no_host_read():
    """GradScaler hands found_inf / grad_scale as device tensors; the kernels read them."""
    with FakeTensorMode():
        model = _model()
        opt = fused_flat.FSGLD(model.parameters(), lr=0.1, beta=1e4, seed=1, backend="cuda")
        opt.perturb()
        _backward(model)
        opt.grad_scale = torch.ones((), device="cuda")
        opt.found_inf = torch.zeros((), device="cuda")
        opt.step()
        del opt.grad_scale, opt.found_inf
        assert opt.step_count == 1


def test_rwsam_passes_make_no_host_read():
    with FakeTensorMode():
        model = _model()
        opt = fused_flat.RWSAM(model.parameters(), lr=0.1, delta=1e-3, seed=1, backend="cuda")
        b = opt.buckets()[0]
        ps = [p.data.view(-1) for p in b.params]
        bk = [torch.empty_like(p) for p in ps]
        opt._backends[0].sam_probe_(ps, bk, [b.index(j) for j in range(len(ps))], opt.seed,
                                    b.bucket_id, 0, 1e-3)
        w = opt.sample_weights(torch.rand(5, device="cuda"), torch.rand(5, device="cuda"))
        assert w.shape == (5,)
        _backward(model)
        opt.first_step(zero_grad=True)
        _backward(model)
        opt.second_step()
        assert opt.step_count == 1
