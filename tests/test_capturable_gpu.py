"""capturable=True on a real GPU (run by `make gpu-check`; skipped without CUDA): a whole
training step (forward, backward, optimizer step) captured once in a CUDA graph and replayed
with an LR scheduler moving the device lr is bitwise equal to the same steps run eagerly, for
the Langevin family and SAM, on every backend that reads the per-step values on the device."""
import pytest
import torch
from torch import nn

import fused_flat

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
STEPS = 8


def _backends():
    out = []
    for name in ("triton", "cuda"):
        try:
            b = fused_flat.backends.get(name)
        except RuntimeError:
            continue
        if b.device_scalars:
            out.append(name)
    return out


def _setup(name, backend, dtype):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10)).to("cuda", dtype)
    lr = torch.tensor(0.05, device="cuda")
    kw = dict(lr=lr, seed=5, backend=backend, capturable=True)
    if name == "FSGLD":
        opt = fused_flat.FSGLD(m.parameters(), beta=1e4, momentum=0.9, **kw)
    elif name == "FSGLD-sr":
        opt = fused_flat.FSGLD(m.parameters(), beta=1e4, stochastic_rounding=True, **kw)
    elif name == "SGLD":
        opt = fused_flat.SGLD(m.parameters(), beta=1e4, momentum=0.9, **kw)
    else:
        opt = fused_flat.SAM(m.parameters(), rho=0.05, momentum=0.9, adaptive=name == "ASAM", **kw)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(32, 64, device="cuda", generator=g).to(dtype)
    y = torch.randint(0, 10, (32,), device="cuda", generator=g)
    return m, opt, x, y


def _train_step(name, m, opt, x, y):
    def loss_fn():
        return nn.functional.cross_entropy(m(x).float(), y)

    if name in ("SAM", "ASAM"):
        opt.zero_grad(set_to_none=False)
        loss_fn().backward()
        opt.first_step(zero_grad=True)
        loss_fn().backward()
        opt.second_step()
    else:
        opt.perturb()
        opt.zero_grad(set_to_none=False)
        loss_fn().backward()
        opt.step()


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name", ["SGLD", "FSGLD", "FSGLD-sr", "SAM", "ASAM"])
def test_cuda_graph_replay_equals_eager(name, backend):
    dtype = torch.bfloat16 if name == "FSGLD-sr" else torch.float32
    # eager
    m, opt, x, y = _setup(name, backend, dtype)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
    for _ in range(STEPS):
        _train_step(name, m, opt, x, y)
        sched.step()
    eager = [p.detach().clone() for p in m.parameters()]

    # captured: two warm-up steps on a side stream (they allocate the gradients and the
    # momentum buffers), then one capture, replayed for the remaining steps
    m, opt, x, y = _setup(name, backend, dtype)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            _train_step(name, m, opt, x, y)
            sched.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _train_step(name, m, opt, x, y)
    for _ in range(STEPS - 2):
        graph.replay()
        sched.step()   # fills the device lr in place: the graph reads the new value
    torch.cuda.synchronize()
    assert opt.step_count == STEPS   # the counter was incremented on the device by each replay
    for a, b in zip(eager, m.parameters()):
        assert torch.equal(a, b.detach()), (name, backend, (a.float() - b.float()).abs().max())
