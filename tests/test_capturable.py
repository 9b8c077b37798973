"""capturable=True (issue 12 item 4): the step counter lives on the parameters' device and the
kernels read it there, as they read a tensor lr that an LR scheduler updates in place, so a
captured CUDA graph replays every step with its own noise and learning rate.

On CPU the same code path runs (counter and lr as CPU tensors handed to the kernels): every
optimizer, with capturable=True and a tensor lr under StepLR, is bitwise equal to the default
(host counter, float lr) on the reference and C++ backends and on the Triton list kernels under
the interpreter. The fake-CUDA cases show the step makes no host read with the counter on the
device. tests/test_capturable_gpu.py captures whole train steps in a CUDA graph (GPU only)."""
import copy

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import fused_flat
from fused_flat.backends import _native
from tests.conftest import cpu_backends
from tests.test_no_host_sync import _backward   # what backward leaves, on fake CUDA tensors

STEPS = 6


def _backends():
    """The CPU backends, and Triton where its interpreter runs CPU tensors."""
    out = cpu_backends()
    try:
        if "cpu" in fused_flat.backends.get("triton").devices:
            out.append("triton")
    except RuntimeError:
        pass
    return out


def _make(name, params, lr, backend, capturable, dtype=torch.float32):
    kw = dict(lr=lr, seed=3, backend=backend, capturable=capturable)
    if name == "SGLD":
        return fused_flat.SGLD(params, beta=1e4, momentum=0.9, **kw)
    if name == "FSGLD":
        return fused_flat.FSGLD(params, beta=1e4, momentum=0.9, weight_decay=1e-3, **kw)
    if name == "FSGLD-sr":
        return fused_flat.FSGLD(params, beta=1e4, stochastic_rounding=True, **kw)
    if name == "RWP":
        return fused_flat.RWP(params, sigma=0.01, momentum=0.9, **kw)
    if name == "SAM":
        return fused_flat.SAM(params, rho=0.05, momentum=0.9, **kw)
    if name == "ASAM":
        return fused_flat.SAM(params, rho=0.05, adaptive=True, **kw)
    if name == "RWSAM":
        return fused_flat.RWSAM(params, rho=0.05, delta=1e-3, **kw)
    raise KeyError(name)


def _model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)).to(dtype)


def _train(name, backend, capturable):
    dtype = torch.bfloat16 if name == "FSGLD-sr" else torch.float32
    m = _model(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 5, generator=g).to(dtype)
    y = torch.randn(16, 2, generator=g).to(dtype)
    lr = torch.tensor(0.05) if capturable else 0.05
    opt = _make(name, m.parameters(), lr, backend, capturable, dtype)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)

    def loss_fn():
        return nn.functional.mse_loss(m(x).float(), y.float())

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    for _ in range(STEPS):
        if name in ("SAM", "ASAM"):
            closure()
            opt.step(closure)
        elif name == "RWSAM":   # the closure returns per-sample losses, no backward
            opt.step(lambda: (m(x).float() - y.float()).square().mean(1))
        else:
            opt.step(closure)
        sched.step()
    return m, opt


CASES = ["SGLD", "FSGLD", "FSGLD-sr", "RWP", "SAM", "ASAM", "RWSAM"]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name", CASES)
def test_capturable_equals_default(name, backend):
    ref, ref_opt = _train(name, backend, capturable=False)
    got, opt = _train(name, backend, capturable=True)
    assert opt._k_dev is not None and opt._k_dev.dtype == torch.int64
    assert opt.step_count == STEPS == ref_opt.step_count
    for a, b in zip(ref.parameters(), got.parameters()):
        assert torch.equal(a, b), (name, backend, (a.float() - b.float()).abs().max())
    # the scheduler moved the tensor lr in place (StepLR(2, 0.5) over 6 steps)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.05 * 0.5 ** 3)


def test_state_dict_roundtrip_resumes_bit_exactly():
    m, opt = _train("FSGLD", "reference", capturable=True)
    sd = copy.deepcopy(opt.state_dict())   # what torch.save / torch.load give: no shared buffers
    m2 = _model(torch.float32)
    m2.load_state_dict(m.state_dict())
    opt2 = _make("FSGLD", m2.parameters(), torch.tensor(0.05), "reference", True)
    opt2.load_state_dict(sd)
    assert opt2.step_count == STEPS
    x = torch.randn(4, 5)
    for mod, o in ((m, opt), (m2, opt2)):
        def closure():
            o.zero_grad()
            loss = mod(x).square().mean()
            loss.backward()
            return loss
        o.step(closure)
    assert opt2.step_count == STEPS + 1 and int(opt2._k_dev) == STEPS + 1
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_counter_follows_step_count_assignment():
    m = _model(torch.float32)
    opt = fused_flat.FSGLD(m.parameters(), lr=torch.tensor(0.1), beta=1e4, seed=1,
                           backend="reference", capturable=True)
    opt.buckets()
    opt._k = 7
    assert int(opt._k_dev) == 7 and opt.step_count == 7


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_capturable_must_be_bool(bad):
    with pytest.raises(ValueError, match="capturable must be True or False"):
        fused_flat.FSGLD(_model(torch.float32).parameters(), lr=0.1, beta=1e4, capturable=bad)


@pytest.mark.filterwarnings("ignore:fused_flat SAM")
def test_sam_capturable_needs_fused_sgd_base():
    with pytest.raises(ValueError, match="capturable"):
        fused_flat.SAM(_model(torch.float32).parameters(), base_optimizer=torch.optim.Adam,
                       lr=0.1, capturable=True)


def test_capturable_refuses_parameters_on_two_devices():
    with FakeTensorMode():   # a CPU and a (fake) CUDA parameter; meta ones are refused earlier
        a = nn.Parameter(torch.randn(3))
        b = nn.Parameter(torch.randn(3, device="cuda"))
        with pytest.raises(ValueError, match="one device"):
            fused_flat.FSGLD([a, b], lr=0.1, beta=1e4, seed=1, backend="reference",
                             capturable=True)


needs_cuda_ops = pytest.mark.skipif(not (_native.available() and _native.cuda_built()),
                                    reason="needs the extension built with its CUDA ops")


@needs_cuda_ops
def test_capturable_refuses_host_backend_on_cuda():
    with FakeTensorMode():
        p = nn.Parameter(torch.randn(4, device="cuda"))
        with pytest.raises(ValueError, match="reads them on the host"):
            fused_flat.FSGLD([p], lr=0.1, beta=1e4, seed=1, backend="reference", capturable=True)


@needs_cuda_ops
def test_capturable_refuses_cpu_lr_with_cuda_parameters():
    with FakeTensorMode():
        p = nn.Parameter(torch.randn(4, device="cuda"))
        opt = fused_flat.FSGLD([p], lr=torch.tensor(0.1), beta=1e4, seed=1, backend="cuda",
                               capturable=True)
        opt.perturb()
        p.grad = torch.randn_like(p)
        with pytest.raises(ValueError, match="must be on the parameters' device"):
            opt.step()


FAKE = {
    "SGLD": lambda ps, lr: fused_flat.SGLD(ps, lr=lr, beta=1e4, momentum=0.9, seed=1,
                                           backend="cuda", capturable=True),
    "FSGLD": lambda ps, lr: fused_flat.FSGLD(ps, lr=lr, beta=1e4, momentum=0.9, seed=1,
                                             backend="cuda", capturable=True),
    "FSGLD-sr": lambda ps, lr: fused_flat.FSGLD(ps, lr=lr, beta=1e4, stochastic_rounding=True,
                                                seed=1, backend="cuda", capturable=True),
    "RWP": lambda ps, lr: fused_flat.RWP(ps, lr=lr, sigma=0.01, seed=1, backend="cuda",
                                         capturable=True),
    "SAM": lambda ps, lr: fused_flat.SAM(ps, lr=lr, momentum=0.9, seed=1, backend="cuda",
                                         capturable=True),
    "ASAM": lambda ps, lr: fused_flat.SAM(ps, lr=lr, adaptive=True, seed=1, backend="cuda",
                                          capturable=True),
    "MSAM": lambda ps, lr: fused_flat.MSAM(ps, lr=lr, micro_batch_size=2, seed=1, backend="cuda",
                                           capturable=True),
}


@needs_cuda_ops
@pytest.mark.parametrize("name", list(FAKE))
def test_capturable_step_makes_no_host_read_on_cuda(name):
    """Fake CUDA tensors: any host read raises. With capturable=True the counter and the lr
    are device tensors handed to the kernels, and the counter is incremented on the device."""
    with FakeTensorMode():
        dtype = torch.bfloat16 if name == "FSGLD-sr" else torch.float32
        kw = dict(device="cuda", dtype=dtype)
        model = nn.Sequential(nn.Linear(6, 8, **kw), nn.Tanh(), nn.Linear(8, 3, **kw))
        lr = torch.tensor(0.1, device="cuda")
        if name in ("SAM", "ASAM", "MSAM"):
            # torch.optim.SGD's constructor checks `lr < 0` (a host read, once: fine on a GPU,
            # refused by the fake mode); so here the device lr comes in after construction
            opt = FAKE[name](list(model.parameters()), 0.1)
            opt.param_groups[0]["lr"] = lr
        else:
            opt = FAKE[name](list(model.parameters()), lr)
        for _ in range(3):
            if name in ("SAM", "ASAM"):
                opt.zero_grad()
                _backward(model)
                opt.step(lambda: _backward(model))
            elif name == "MSAM":
                opt.step(lambda mb: _backward(model), torch.randn(4, 6, device="cuda"))
            else:
                def closure():
                    opt.zero_grad()
                    return _backward(model)
                opt.step(closure)
            lr.mul_(0.5)   # what a scheduler does to a tensor lr: in place, on the device
        assert opt._k_dev.device.type == "cuda"
        with pytest.raises(Exception):   # reading the counter is a host read: the mode catches it
            opt.step_count


@needs_cuda_ops
def test_device_lr_without_capturable_is_refused():
    """A tensor lr on the device read on the host every step would be a sync per step."""
    with FakeTensorMode():
        p = nn.Parameter(torch.randn(4, device="cuda"))
        opt = fused_flat.FSGLD([p], lr=torch.tensor(0.1, device="cuda"), beta=1e4, seed=1,
                               backend="cuda")
        opt.perturb()
        p.grad = torch.randn_like(p)
        with pytest.raises(ValueError, match="capturable=True"):
            opt.step()


@needs_cuda_ops
def test_rwsam_capturable_passes_make_no_host_read():
    """RW-SAM's step runs a backward of its own (no autograd on fake CUDA tensors without a
    driver), so its passes are checked one by one: the probe reads the device counter."""
    with FakeTensorMode():
        model = nn.Sequential(nn.Linear(6, 8, device="cuda"), nn.Tanh(), nn.Linear(8, 3, device="cuda"))
        opt = fused_flat.RWSAM(model.parameters(), lr=0.1, delta=1e-3, seed=1, backend="cuda",
                               capturable=True)
        opt.param_groups[0]["lr"] = torch.tensor(0.1, device="cuda")
        b = opt.buckets()[0]
        be = opt._backends[0]
        k = opt._step_arg(be)
        assert k is opt._k_dev and k.device.type == "cuda"
        ps = [p.data.view(-1) for p in b.params]
        bk = [torch.empty_like(p) for p in ps]
        be.sam_probe_(ps, bk, [b.index(j) for j in range(len(ps))], opt.seed, b.bucket_id, k, 1e-3)
        _backward(model)
        opt.first_step(zero_grad=True)
        _backward(model)
        opt.second_step()
        with pytest.raises(Exception):   # the counter is on the device: reading it is a host read
            opt.step_count
