"""The optimizers drop into ordinary training code: parameters, gradients and state stay
torch's own tensors (a bucket is an index space, not a buffer), with torch.optim's meaning.

Each test is a regression test of a way real training code broke the physical-buffer
design (tensor-list buckets issue)."""
import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

from fused_flat import FSGLD, RWP, SAM, SGLD
from tests.conftest import cpu_backends
from tests.helpers import bucket_noise, flat_cat

BACKENDS = cpu_backends()


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).to(dtype)


def data(i=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(8, 6, generator=g, dtype=dtype), torch.randn(8, 3, generator=g, dtype=dtype)


def loss_of(model, i=0):
    x, y = data(i, next(model.parameters()).dtype)
    return ((model(x) - y) ** 2).mean()


def closure_for(model, opt, i=0):
    def closure():
        opt.zero_grad()
        loss = loss_of(model, i)
        loss.backward()
        return loss
    return closure


def sgd_pair(momentum=0.9, **kw):
    """(reference model + torch SGD, model + noise-free SGLD): the same trajectory."""
    a, b = mlp(), mlp()
    return (a, torch.optim.SGD(a.parameters(), lr=0.1, momentum=momentum, **kw),
            b, SGLD(b.parameters(), lr=0.1, beta=math.inf, momentum=momentum, **kw))


def assert_same_params(m1, m2, tol=1e-6):
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- storage
@pytest.mark.parametrize("cls", [FSGLD, SAM])
def test_parameters_keep_storage_and_grads_stay_users(cls):
    model = mlp()
    ptrs = [(p.data_ptr(), p.stride()) for p in model.parameters()]
    opt = cls(model.parameters(), lr=0.1, momentum=0.9) if cls is SAM else \
        cls(model.parameters(), lr=0.1, beta=1e6, momentum=0.9)
    assert [(p.data_ptr(), p.stride()) for p in model.parameters()] == ptrs
    for i in range(3):
        opt.zero_grad()
        loss_of(model, i).backward()
        grads = [p.grad for p in model.parameters()]
        if cls is SAM:
            opt.first_step()
            assert [p.grad for p in model.parameters()] == grads
            opt.zero_grad()
            loss_of(model, i).backward()
            grads = [p.grad for p in model.parameters()]
            opt.second_step()
        else:
            opt.perturb()
            opt.step()
        assert all(p.grad is g for p, g in zip(model.parameters(), grads))   # not replaced
        assert [(p.data_ptr(), p.stride()) for p in model.parameters()] == ptrs
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())   # set_to_none, like torch


def test_safetensors_round_trip():
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = mlp()
    opt = FSGLD(model.parameters(), lr=0.1, beta=1e6, momentum=0.9, seed=1)
    for i in range(2):
        opt.step(closure_for(model, opt, i))
    buf = safetensors_torch.save(dict(model.state_dict()))
    loaded = safetensors_torch.load(buf)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded[k], v)
    import tempfile, os  # noqa: E401
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.safetensors")
        safetensors_torch.save_model(model, path)            # refused a shared flat storage
        fresh = mlp(seed=5)
        safetensors_torch.load_model(fresh, path)
        assert_same_params(fresh, model, tol=0)
        safetensors_torch.save_file(dict(model.state_dict()), path)
        assert all(torch.equal(safetensors_torch.load_file(path)[k], v)
                   for k, v in model.state_dict().items())


def test_torch_save_of_one_parameter_is_its_own_size():
    model = nn.Sequential(nn.Linear(300, 300), nn.Linear(300, 10))
    FSGLD(model.parameters(), lr=0.1)
    bias = model[1].bias
    sizes = []
    for t in (bias, nn.Parameter(bias.detach().clone())):   # the optimizer's, a standalone one
        f = io.BytesIO()
        torch.save(t, f)
        sizes.append(len(f.getvalue()))
    assert sizes[0] <= sizes[1] + 1024


# ----------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_is_kept_and_noise_follows_memory_order(backend):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3).to(memory_format=torch.channels_last)
    w = conv.weight
    assert not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)
    opt = FSGLD(conv.parameters(), lr=0.0, beta=1e4, seed=3, backend=backend)
    before = [p.detach().clone() for p in conv.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.perturb()
    assert w.is_contiguous(memory_format=torch.channels_last)
    eps, _ = bucket_noise(list(conv.parameters()), 3, 0, 0)
    sigma = 1e4 ** (-(1 + 0.01) / 4)
    torch.testing.assert_close(flat_cat(conv.parameters()), flat_cat(before) + sigma * eps,
                               rtol=1e-6, atol=1e-6)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    conv(x).square().mean().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert w.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(flat_cat(conv.parameters()), flat_cat(before), rtol=0, atol=1e-6)


def test_model_converted_to_channels_last_after_construction():
    ref, model = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
    model.load_state_dict(ref.state_dict())
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = SGLD(model.parameters(), lr=0.1, beta=math.inf, momentum=0.9)
    x = torch.randn(2, 3, 6, 6)
    for m, o in ((ref, sgd), (model, opt)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    model.to(memory_format=torch.channels_last)
    ref.to(memory_format=torch.channels_last)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            for m, o in ((ref, sgd), (model, opt)):
                o.zero_grad()
                m(x.to(memory_format=torch.channels_last)).square().mean().backward()
                o.step()
    assert model.weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_params(model, ref)


def test_non_dense_parameter_gets_a_clear_error():
    base = torch.zeros(10, 10)
    p = nn.Parameter(base[:, ::2])   # a strided view: not dense
    with pytest.raises(ValueError, match="not dense"):
        FSGLD([p], lr=0.1)


def test_model_half_after_construction_keeps_working():
    ref, model = mlp(), mlp()
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = SGLD(model.parameters(), lr=0.1, beta=math.inf, momentum=0.9)
    for m, o in ((ref, sgd), (model, opt)):
        o.zero_grad()
        loss_of(m).backward()
        o.step()
    model.double()
    ref.double()
    for m, o in ((ref, sgd), (model, opt)):
        for i in range(2):
            o.zero_grad()
            loss_of(m, i).backward()
            o.step() if o is sgd else o.step()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert all(s["momentum_buffer"].dtype == torch.float64 for s in opt.state.values())
    assert_same_params(model, ref, tol=1e-6)


# ----------------------------------------------------------------------------- torch.optim semantics
def test_frozen_then_unfrozen_parameter_is_updated():
    """Gradual unfreezing: frozen at construction, unfrozen later, then trained; the index
    space did not move, so the other parameters' noise is unchanged."""
    a, sgd, b, opt = sgd_pair()
    for m in (a, b):
        m[0].weight.requires_grad_(False)
    sgd = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    opt = SGLD(b.parameters(), lr=0.1, beta=math.inf, momentum=0.9)
    for i in range(4):
        if i == 2:
            for m in (a, b):
                m[0].weight.requires_grad_(True)
        for m, o in ((a, sgd), (b, opt)):
            o.zero_grad()
            loss_of(m, i).backward()
            o.step()
    assert not torch.equal(b[0].weight, mlp()[0].weight)
    assert_same_params(a, b)


def test_frozen_parameters_keep_their_place_in_the_index_space():
    m1, m2 = mlp(), mlp()
    m2[0].weight.requires_grad_(False)
    o1 = FSGLD(m1.parameters(), lr=0.0, beta=1e4, seed=9)
    o2 = FSGLD(m2.parameters(), lr=0.0, beta=1e4, seed=9)
    o1.perturb()
    o2.perturb()
    assert torch.equal(m2[0].weight, mlp()[0].weight)          # frozen: never perturbed
    for name in ("0.bias", "2.weight", "2.bias"):               # the others: the same noise
        assert torch.equal(dict(m1.named_parameters())[name], dict(m2.named_parameters())[name])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_written_in_place_are_used(backend):
    a, sgd, b, opt = sgd_pair()
    opt = SGLD(b.parameters(), lr=0.1, beta=math.inf, momentum=0.9, backend=backend)
    for m, o in ((a, sgd), (b, opt)):
        o.zero_grad()
        loss_of(m).backward()
        o.step()
    torch.manual_seed(7)
    given = [torch.randn_like(p) for p in a.parameters()]
    for m, o in ((a, sgd), (b, opt)):
        o.zero_grad(set_to_none=False)
        for p, g in zip(m.parameters(), given):
            p.grad.copy_(g)                       # hand-written gradient, in place
        o.step()
    assert_same_params(a, b)


def test_gradient_assigned_by_hand_is_used():
    a, sgd, b, opt = sgd_pair(momentum=0.0)
    torch.manual_seed(7)
    given = [torch.randn_like(p) for p in a.parameters()]
    for m, o in ((a, sgd), (b, opt)):
        for p, g in zip(m.parameters(), given):
            p.grad = g.clone()
        o.step()
    assert_same_params(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("zero", ["model", "opt", "none"])
def test_n_perturbations_averages_whatever_the_closure_zeroes(backend, zero):
    model, probe = mlp(), mlp()
    theta0 = flat_cat(model.parameters()).clone()
    sigma, lr = 0.05, 0.1
    opt = RWP(model.parameters(), lr=lr, sigma=sigma, n_perturbations=2, seed=5, backend=backend)

    def closure():
        if zero == "model":
            model.zero_grad()
        elif zero == "opt":
            opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        return loss

    opt.zero_grad()
    opt.step(closure)
    grads = []
    for t in range(2):
        eps, _ = bucket_noise(list(probe.parameters()), 5, 0, 0, tag=t)
        torch.nn.utils.vector_to_parameters(theta0 + sigma * eps, probe.parameters())
        probe.zero_grad()
        loss_of(probe).backward()
        grads.append(flat_cat(p.grad for p in probe.parameters()))
    expected = theta0 - lr * (grads[0] + grads[1]) / 2
    torch.testing.assert_close(flat_cat(model.parameters()), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_replaced_gradient_skips_and_restores(backend):
    model = mlp()
    opt = FSGLD(model.parameters(), lr=0.1, beta=1e4, momentum=0.9, backend=backend, exact_restore=True)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        g = model[2].bias.grad.clone()
        g[0] = float("nan")
        model[2].bias.grad = g          # a replaced gradient tensor
        return loss

    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(closure)
    assert opt.last_step_skipped
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not opt.state or all("momentum_buffer" not in s for s in opt.state.values())


def test_state_holds_live_momentum_after_each_step():
    a, sgd, b, opt = sgd_pair(momentum=0.9, dampening=0.1)
    for i in range(3):
        for m, o in ((a, sgd), (b, opt)):
            o.zero_grad()
            loss_of(m, i).backward()
            o.step()
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(opt.state[q]["momentum_buffer"], sgd.state[p]["momentum_buffer"],
                                       rtol=1e-6, atol=1e-7)
    bufs = [opt.state[q]["momentum_buffer"] for q in b.parameters()]
    opt.zero_grad()
    loss_of(b).backward()
    opt.step()
    assert all(opt.state[q]["momentum_buffer"] is buf for q, buf in zip(b.parameters(), bufs))


def test_sgd_checkpoint_warm_starts():
    a, sgd, b, opt = sgd_pair(momentum=0.9)
    for i in range(3):
        sgd.zero_grad()
        loss_of(a, i).backward()
        sgd.step()
    b.load_state_dict(a.state_dict())
    seed = opt.seed
    with pytest.warns(UserWarning, match="warm start"):
        opt.load_state_dict(copy.deepcopy(sgd.state_dict()))   # as if saved to disk
    assert opt.seed == seed and opt.step_count == 0
    for i in range(3, 6):
        for m, o in ((a, sgd), (b, opt)):
            o.zero_grad()
            loss_of(m, i).backward()
            o.step()
    assert_same_params(a, b)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "fused_flat"}
    assert set(sd["state"][0]) == {"momentum_buffer"}


def test_sam_warm_starts_from_sgd_and_keeps_sgd_state_format():
    a = mlp()
    sgd = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    sgd.zero_grad()
    loss_of(a).backward()
    sgd.step()
    b = mlp()
    b.load_state_dict(a.state_dict())
    opt = SAM(b.parameters(), lr=0.1, momentum=0.9, rho=0.0)
    with pytest.warns(UserWarning, match="warm start"):
        opt.load_state_dict(copy.deepcopy(sgd.state_dict()))   # as if saved to disk
    for m, o in ((a, sgd), (b, opt)):
        o.zero_grad()
        loss_of(m, 1).backward()
        if o is opt:
            o.step(lambda: loss_of(b, 1).backward())
        else:
            o.step()
    assert_same_params(a, b)
    assert set(opt.state_dict()["state"][0]) == {"momentum_buffer"}


def test_format_1_checkpoint_loads_with_a_warning():
    model = mlp()
    opt = FSGLD(model.parameters(), lr=0.1, beta=1e6, momentum=0.9, seed=3)
    opt.step(closure_for(model, opt))
    sd = opt.state_dict()
    sd["fused_flat"]["format"] = 1
    other = FSGLD(mlp().parameters(), lr=0.1, beta=1e6, momentum=0.9)
    with pytest.warns(UserWarning, match="different"):
        other.load_state_dict(sd)
    assert other.seed == 3 and other.step_count == 1


def test_parameter_added_later_with_add_param_group():
    model = mlp()
    opt = FSGLD([model[0].weight, model[0].bias], lr=0.1, beta=1e6, seed=2)
    opt.step(closure_for(model, opt))
    opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.05})
    before = model[2].weight.detach().clone()
    opt.step(closure_for(model, opt, 1))
    assert not torch.equal(model[2].weight, before)
    sam = SAM([model[0].weight], lr=0.1)
    sam.add_param_group({"params": [model[0].bias]})
    assert len(sam.param_groups) == 2 and sam.param_groups[1]["rho"] == 0.05
