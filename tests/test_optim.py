"""SGLD / FSGLD / RWP against torch.optim.SGD, the reference backend and the spec."""
import math
import warnings

import pytest
import torch
from torch import nn

import fused_flat
from fused_flat import FSGLD, RWP, SGLD, noise
from fused_flat.backends import reference
from tests.conftest import cpu_backends
from tests.helpers import bucket_noise

BACKENDS = cpu_backends()


def small_model(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 3)).to(dtype)


def batch(i, dtype=torch.float64):
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(16, 7, generator=g, dtype=dtype), torch.randn(16, 3, generator=g, dtype=dtype)


def train(model, opt, steps, start=0, closure_form=True):
    for i in range(start, start + steps):
        x, y = batch(i, next(model.parameters()).dtype)

        def closure():
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss

        if closure_form:
            opt.step(closure)
        else:
            if hasattr(opt, "perturb"):
                opt.perturb()
            closure()
            opt.step()


SGD_CONFIGS = [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.8, dampening=0.3, weight_decay=1e-2),
    dict(weight_decay=5e-4, maximize=True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", SGD_CONFIGS)
@pytest.mark.parametrize("cls", ["SGLD", "FSGLD"])
def test_zero_noise_reproduces_sgd(backend, cfg, cls):
    ref_model, model = small_model(), small_model()
    sgd = torch.optim.SGD(ref_model.parameters(), lr=0.05, **cfg)
    if cls == "SGLD":
        opt = SGLD(model.parameters(), lr=0.05, beta=math.inf, backend=backend, **cfg)
    else:
        opt = FSGLD(model.parameters(), lr=0.05, beta=math.inf, sigma=0.0, backend=backend, **cfg)
    train(ref_model, sgd, 20)
    train(model, opt, 20)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    if cfg.get("momentum"):
        for pa, pb in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(opt.state_dict()["state"][0]["momentum_buffer"],
                                       sgd.state_dict()["state"][0]["momentum_buffer"], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fsgld_one_step_matches_the_spec(backend):
    """theta1 = theta0 - lr (g(theta0 + sigma eps) + wd theta0) + sqrt(2 lr / beta) xi."""
    model = small_model(torch.float32)
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    lr, beta, eta, wd = 0.1, 1e6, 0.01, 5e-4
    opt = FSGLD(model.parameters(), lr=lr, beta=beta, eta=eta, weight_decay=wd, seed=11, backend=backend)
    sigma = beta ** (-(1 + eta) / 4)
    x, y = batch(0, torch.float32)
    eps, xi = bucket_noise(list(model.parameters()), 11, 0, 0)
    # gradient at the perturbed point, computed independently
    probe = small_model(torch.float32)
    torch.nn.utils.vector_to_parameters(theta0 + sigma * eps, probe.parameters())
    ((probe(x) - y) ** 2).mean().backward()
    g = torch.cat([p.grad.reshape(-1) for p in probe.parameters()])
    expected = theta0 - lr * (g + wd * theta0) + math.sqrt(2 * lr / beta) * xi

    def closure():
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


SIZES = [1, 2, 3, 4097, 278011, (1 << 20) + 7]


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_cpp_passes_match_reference(n, momentum, nesterov):
    from tests import cpp_per_tensor as ops
    gen = torch.Generator().manual_seed(n)
    p0 = torch.randn(n, generator=gen)
    g = torch.randn(n, generator=gen)
    m0 = torch.randn(n, generator=gen)
    out = {}
    for name, mod in (("cpp", ops), ("reference", reference)):
        p, m = p0.clone(), m0.clone()
        mod.perturb_(p, 5, 2, 3, 0, 0.01, 0)
        mod.restore_and_step_(p, g, m if momentum else None, None, None, 5, 2, 3, 0, 0, 0.01, 0.1,
                              5e-4, momentum, 0.0, nesterov, False, 1e-3, 1.0)
        out[name] = (p, m)
    for a, b in zip(out["cpp"], out["reference"]):
        scale = b.abs().max().clamp_min(1.0)
        assert ((a - b).abs().max() / scale).item() <= 1e-6


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
@pytest.mark.parametrize("offset", [1, 2, 5])
@pytest.mark.parametrize("tag", [0, 3])
def test_cpp_slices_with_offsets_match_reference(offset, tag):
    from tests import cpp_per_tensor as ops
    n = 1001
    p0, g = torch.randn(n), torch.randn(n)
    out = []
    for mod in (ops, reference):
        p = p0.clone()
        mod.perturb_(p, 1, 0, 0, tag, 0.5, offset)
        mod.restore_and_step_(p, g, None, None, None, 1, 0, 0, offset, tag, 0.25, 0.1, 0.0, 0.0, 0.0,
                              False, False, 0.01, 1.0)
        out.append(p)
    assert (out[0] - out[1]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,kw", [(FSGLD, dict(beta=1e4, momentum=0.9, weight_decay=1e-3)),
                                    (SGLD, dict(beta=1e4, momentum=0.5)),
                                    (RWP, dict(sigma=0.05, momentum=0.9, nesterov=True))])
def test_resume_is_bit_identical(backend, cls, kw, tmp_path):
    model = small_model(torch.float32)
    opt = cls(model.parameters(), lr=0.05, seed=123, backend=backend, **kw)
    train(model, opt, 20)
    straight = [p.detach().clone() for p in model.parameters()]

    model = small_model(torch.float32)
    opt = cls(model.parameters(), lr=0.05, seed=123, backend=backend, **kw)
    train(model, opt, 10)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    del model, opt
    ckpt = torch.load(tmp_path / "ckpt.pt")
    model2 = small_model(torch.float32, seed=99)      # different init: everything comes from the file
    model2.load_state_dict(ckpt["model"])
    opt2 = cls(model2.parameters(), lr=0.05, seed=7, backend=backend, **kw)
    opt2.load_state_dict(ckpt["opt"])
    train(model2, opt2, 10, start=10)
    for a, b in zip(model2.parameters(), straight):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_call_form_equals_closure_form(backend):
    runs = []
    for closure_form in (True, False):
        model = small_model(torch.float32)
        opt = FSGLD(model.parameters(), lr=0.05, beta=1e4, momentum=0.9, seed=5, backend=backend)
        train(model, opt, 5, closure_form=closure_form)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_default_seed_follows_torch_manual_seed():
    seeds = []
    for s in (3, 3, 4):
        model = small_model()
        torch.manual_seed(s)
        seeds.append(FSGLD(model.parameters()).seed)
    a, b, c = seeds
    assert a == b != c and 0 <= a < 2 ** 63


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_follows_scheduled_lr(backend):
    """With a zero gradient and no perturbation, one SGLD step adds exactly sqrt(2 lr / beta) xi."""
    p = nn.Parameter(torch.zeros(10_000))
    opt = SGLD([p], lr=1.0, beta=1e4, seed=3, backend=backend)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.25)
    for k, lr in enumerate([1.0, 0.25]):
        before = p.detach().clone()
        opt.zero_grad()
        (p * 0.0).sum().backward()     # a zero gradient, delivered by autograd
        opt.step()
        sched.step()
        _, xi = noise.gaussian_noise(3, 0, k, 0, 0, p.numel())
        torch.testing.assert_close(p.detach() - before, math.sqrt(2 * lr / 1e4) * xi, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_n_perturbations_averages_gradients(backend):
    torch.manual_seed(0)
    lin = nn.Linear(5, 1, bias=False)
    w0 = lin.weight.detach().clone().reshape(-1)
    x = torch.randn(8, 5)
    n, sigma, lr = 3, 0.1, 0.5
    opt = RWP(lin.parameters(), lr=lr, sigma=sigma, n_perturbations=n, seed=8, backend=backend)
    calls = []

    def closure():
        opt.zero_grad()          # ignored for the 2nd and 3rd call: gradients accumulate
        calls.append(lin.weight.detach().clone().reshape(-1))
        loss = (lin(x) ** 3).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert len(calls) == n
    grads = []
    for t in range(n):
        eps, _ = noise.gaussian_noise(8, 0, 0, t, 0, 5)
        wt = w0 + sigma * eps
        torch.testing.assert_close(calls[t], wt, rtol=1e-6, atol=1e-6)
        grads.append(3 * ((x @ wt) ** 2) @ x)
    expected = w0 - lr * torch.stack(grads).mean(0)
    torch.testing.assert_close(lin.weight.detach().reshape(-1), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exact", [False, True])
def test_nonfinite_gradient_skips_and_restores(backend, exact):
    model = small_model(torch.float32)
    opt = FSGLD(model.parameters(), lr=0.1, beta=1e4, momentum=0.9, seed=1, backend=backend,
                exact_restore=exact)
    train(model, opt, 2)
    before = [p.detach().clone() for p in model.parameters()]
    mom_before = opt.state_dict()["state"][0]["momentum_buffer"].clone()

    def closure():
        opt.zero_grad()
        loss = model(torch.full((2, 7), float("nan"))).sum()
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(closure)
    assert opt.last_step_skipped and opt.skipped_steps == 1
    assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"], mom_before)
    sigma = opt.group_sigma(opt.param_groups[0])
    for a, b in zip(model.parameters(), before):
        if exact:
            assert torch.equal(a, b)
        else:   # restored by regenerating eps: within one ulp of the perturbed value
            ulp = torch.finfo(torch.float32).eps * (b.abs() + 6 * sigma)
            assert ((a - b).abs() <= ulp).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_exception_in_closure_restores(backend):
    model = small_model(torch.float32)
    opt = FSGLD(model.parameters(), lr=0.1, beta=1e2, seed=1, backend=backend, exact_restore=True)
    before = [p.detach().clone() for p in model.parameters()]
    seen = []

    def closure():
        seen.append([p.detach().clone() for p in model.parameters()])
        raise KeyError("boom")

    with pytest.raises(KeyError):
        opt.step(closure)
    assert any(not torch.equal(a, b) for a, b in zip(seen[0], before))   # it was perturbed
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a, b)
    train(model, opt, 1)   # and the optimizer is usable afterwards


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_without_grad_are_left_alone(backend):
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(10)), nn.Parameter(torch.randn(6))
    frozen = nn.Parameter(torch.randn(4), requires_grad=False)
    opt = FSGLD([a, frozen, b], lr=0.1, beta=1e4, momentum=0.9, weight_decay=0.1, seed=2, backend=backend)
    b0, f0 = b.detach().clone(), frozen.detach().clone()

    def closure():
        opt.zero_grad()
        loss = (a ** 2).sum()        # b gets no gradient this step
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.equal(frozen, f0)
    assert ((b - b0).abs() <= 1e-6).all()     # perturbed and restored, not updated
    assert 1 not in [i for i in opt.state_dict()["state"]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_replaced_grad_and_data_are_used_as_torch_does(backend):
    """model.zero_grad(set_to_none=True) and a replaced .data are plain torch: no copy, no
    warning, the same trajectory as torch.optim.SGD."""
    ref_model, model = small_model(torch.float32), small_model(torch.float32)
    sgd = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    opt = SGLD(model.parameters(), lr=0.1, beta=math.inf, momentum=0.9, backend=backend)
    x, y = batch(0, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for m, o in ((ref_model, sgd), (model, opt)):
            for _ in range(3):
                m.zero_grad(set_to_none=True)
                ((m(x) - y) ** 2).mean().backward()
                o.step()
        with torch.no_grad():
            for m in (ref_model, model):
                m[0].weight.data = m[0].weight.data * 0.5   # .data replaced
        for m, o in ((ref_model, sgd), (model, opt)):
            m.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            o.step()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_all_dtypes_step(backend, dtype):
    model = small_model(dtype)
    opt = FSGLD(model.parameters(), lr=0.01, beta=1e6, momentum=0.9, seed=4, backend=backend)
    train(model, opt, 3)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.dtype == dtype for p in model.parameters())


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_cpp_matches_reference_low_precision(dtype):
    runs = []
    for backend in ("cpp", "reference"):
        model = small_model(dtype)
        opt = FSGLD(model.parameters(), lr=0.05, beta=1e4, momentum=0.9, seed=4, backend=backend)
        train(model, opt, 5)
        runs.append([p.detach().double() for p in model.parameters()])
    # bf16/fp16: one unit in the last place; fp64: the noise itself is fp32 and agrees to
    # ~1e-6 between backends (polynomial vs libm log/cos), scaled by sigma = 0.098.
    for a, b in zip(*runs):
        if dtype == torch.float64:
            assert ((a - b).abs() <= 1e-6).all()
        else:
            ulp = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
            assert ((a - b).abs() <= ulp * b.abs().clamp_min(1e-3) * 2).all()


def test_extra_memory_no_parameter_sized_buffer():
    """Default FSGLD holds no tensor of parameter size beyond what SGD with the same momentum
    holds: counted over the optimizer's state and buffers."""
    from fused_flat.optim.langevin import LangevinOptimizer

    def state_numel(opt):
        n = sum(t.numel() for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor))
        if isinstance(opt, LangevinOptimizer):
            n += sum(t.numel() for t in opt._backups.values())
        return n
        return sum(s["momentum_buffer"].numel() for s in opt.state.values() if s.get("momentum_buffer") is not None)

    for mom in (0.0, 0.9):
        m1, m2 = small_model(torch.float32), small_model(torch.float32)
        sgd = torch.optim.SGD(m1.parameters(), lr=0.1, momentum=mom)
        fs = FSGLD(m2.parameters(), lr=0.1, momentum=mom)
        train(m1, sgd, 1)
        train(m2, fs, 1)
        assert state_numel(fs) == state_numel(sgd)
    m3 = small_model(torch.float32)
    ex = FSGLD(m3.parameters(), lr=0.1, exact_restore=True)
    train(m3, ex, 1)
    assert state_numel(ex) == sum(p.numel() for p in m3.parameters())   # the documented backup


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "Invalid learning rate"), (dict(beta=0.0), "beta"), (dict(beta=-3.0), "beta"),
    (dict(eta=0.0), "eta"), (dict(sigma=-0.1), "sigma"), (dict(momentum=1.0), "momentum"),
    (dict(momentum=-0.1), "momentum"), (dict(n_perturbations=0), "n_perturbations"),
    (dict(weight_decay=-1.0), "weight_decay"), (dict(nesterov=True), "Nesterov"),
    (dict(seed=-1), "seed"), (dict(backend="gpu"), "backend"), (dict(lr="fast"), "lr"),
])
def test_invalid_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FSGLD(small_model().parameters(), **kwargs)


def test_sparse_gradients_raise():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = FSGLD(emb.parameters(), lr=0.1, beta=1e4)
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match="sparse"):
        opt.step(lambda: emb(torch.tensor([1, 2])).sum().backward())
    torch.testing.assert_close(emb.weight.detach(), before, rtol=0, atol=1e-6)   # restored before raising


def test_step_without_closure_needs_perturb():
    model = small_model()
    opt = FSGLD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


def test_state_dict_from_another_model_raises():
    a = FSGLD(small_model().parameters(), lr=0.1, momentum=0.9)
    other = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    b = FSGLD(other.parameters(), lr=0.1, momentum=0.9)
    train(other, b, 1)
    with pytest.raises(ValueError, match="different model"):
        a.load_state_dict(b.state_dict())
    sd = a.state_dict()
    sd["fused_flat"]["seed"] = "x"
    with pytest.raises(ValueError, match="corrupted"):
        a.load_state_dict(sd)


def test_package_imports_and_reports_backends():
    av = fused_flat.available_backends()
    assert av["reference"] == "ok"
    assert set(av) >= {"reference", "cpp", "cuda", "triton"}


def test_per_tensor_view_of_a_list_backend():
    from fused_flat import backends

    one = backends.per_tensor(backends.get("reference"))
    a, b = torch.randn(11), torch.randn(11)
    b.copy_(a)
    one.perturb_(a, 3, 1, 2, 0, 0.5, 8)
    reference.perturb_(b, 3, 1, 2, 0, 0.5, 8)
    assert torch.equal(a, b)
    g = torch.randn(11)
    one.restore_and_step_(a, g, None, None, None, 3, 1, 2, 8, 0, 0.5, 0.1, 0.0, 0.0, 0.0, False,
                          False, 0.01, 1.0)
    reference.restore_and_step_(b, g, None, None, None, 3, 1, 2, 8, 0, 0.5, 0.1, 0.0, 0.0, 0.0,
                                False, False, 0.01, 1.0)
    assert torch.equal(a, b)


def test_resolver_decides_by_dtype(monkeypatch):
    """The resolver is the one place that picks a backend, by device AND dtype: 'auto' passes
    over a backend that has no kernels for the bucket's dtype, an explicit name that cannot
    run it raises a ValueError naming the dtype and what to use (here a stand-in 'cpp' that
    takes only fp32, whatever the build)."""
    import dataclasses

    from fused_flat import backends

    fp32_only = dataclasses.replace(backends.get("reference"), name="cpp", devices=("cpu",),
                                    dtypes=(torch.float32,))
    monkeypatch.setitem(backends._cache, "cpp", fp32_only)
    assert backends.resolve("auto", torch.zeros(2)) is fp32_only
    assert backends.resolve("cpp", torch.zeros(2)) is fp32_only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # "the reference runs them"
        assert backends.resolve("auto", torch.zeros(2, dtype=torch.float64)).name == "reference"
    for sam in (False, True):
        with pytest.raises(ValueError, match=r"backend 'cpp' has no torch.float64 kernels \(it "
                                             r"takes float32\).*backend='auto'.*"
                                             r"backend='reference'"):
            backends.resolve("cpp", torch.zeros(2, dtype=torch.float64), sam=sam)
    with pytest.raises(ValueError, match="no torch.float64 kernels"):
        SGLD([nn.Parameter(torch.zeros(3, dtype=torch.float64))], lr=0.1, backend="cpp")
