"""torch.optim idioms that fused_flat optimizers must honour as torch.optim.SGD does:
param groups from generators, meta-device models, copy.deepcopy / torch.save of the
optimizer, torch's hyperparameter checks, the seed broadcast under pipeline parallelism,
steps skipped on the device (GradScaler), sparse gradient layouts, checkpoints of an older
noise layout, and how close beta = inf comes to torch.optim.SGD's rounding."""
from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from torch import nn

from fused_flat import FSGLD, MSAM, RWP, RWSAM, SAM, SGLD, noise
from fused_flat.optim.core import FlatOptimizer
from tests import dist_cases as dc
from tests.conftest import cpu_backends

BACKENDS = cpu_backends()


def mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)).to(dtype)


def loss_of(model, k):
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(100 + k)
    x, y = torch.randn(8, 5, generator=g, dtype=dtype), torch.randn(8, 2, generator=g, dtype=dtype)
    return ((model(x) - y) ** 2).mean()


def step(opt, model, k):
    """One step on batch k in the optimizer's own form (torch.optim.SGD: plain step())."""
    opt.zero_grad()
    if isinstance(opt, SAM):
        loss_of(model, k).backward()
        opt.step(lambda: loss_of(model, k).backward())
    elif isinstance(opt, FlatOptimizer):
        opt.step(lambda: (opt.zero_grad(), loss_of(model, k).backward()))
    else:
        loss_of(model, k).backward()
        opt.step()


def assert_same_params(a, b, rtol=1e-12, atol=1e-14):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- 1. generators
# each is torch.optim.SGD(lr=0.1, momentum=0.9) with its noise and perturbation off
NOISE_FREE = {
    "SGLD": lambda ps: SGLD(ps, lr=0.1, momentum=0.9, beta=math.inf),
    "FSGLD": lambda ps: FSGLD(ps, lr=0.1, momentum=0.9, beta=math.inf),
    "RWP": lambda ps: RWP(ps, lr=0.1, momentum=0.9, sigma=0.0),
    "SAM": lambda ps: SAM(ps, lr=0.1, momentum=0.9, rho=0.0),
}
def _build(make, model, form):
    ps = model.parameters()
    if form == "group":
        return make([{"params": ps}])
    if form == "bare":
        return make(ps)
    opt = make(list(model[0].parameters()))
    opt.add_param_group({"params": model[2].parameters()})
    return opt


@pytest.mark.parametrize("form", ["group", "bare", "add_param_group"])
@pytest.mark.parametrize("name", list(NOISE_FREE))
def test_parameters_from_a_generator_are_kept_and_trained(name, form):
    ref, model = mlp(), mlp()
    sgd = _build(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), ref, form)
    opt = _build(NOISE_FREE[name], model, form)
    assert [len(g["params"]) for g in opt.param_groups] == [len(g["params"]) for g in sgd.param_groups]
    assert sum(len(g["params"]) for g in opt.param_groups) == 4
    before = [p.detach().clone() for p in model.parameters()]
    for k in range(3):
        step(sgd, ref, k)
        step(opt, model, k)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert_same_params(model, ref)


@pytest.mark.parametrize("params", ["set", "group of a set"])
def test_a_set_of_parameters_is_refused_as_torch_does(params):
    p = nn.Parameter(torch.randn(3))
    arg = (lambda: {p}) if params == "set" else (lambda: [{"params": {p}}])
    want = got = None
    try:
        torch.optim.SGD(arg(), lr=0.1)
    except Exception as exc:   # noqa: BLE001
        want = exc
    try:
        SGLD(arg(), lr=0.1)
    except Exception as exc:   # noqa: BLE001
        got = exc
    assert type(got) is type(want) and str(got) == str(want)


# --------------------------------------------------------------------------- 2. meta device
ALL = {   # every class, with noise and momentum on
    "sgld": lambda ps, **kw: SGLD(ps, lr=0.05, beta=1e6, momentum=0.9, **kw),
    "fsgld": lambda ps, **kw: FSGLD(ps, lr=0.05, beta=1e6, momentum=0.9, **kw),
    "rwp": lambda ps, **kw: RWP(ps, lr=0.05, sigma=0.02, momentum=0.9, **kw),
    "sam": lambda ps, **kw: SAM(ps, lr=0.05, momentum=0.9, rho=0.05, **kw),
    "asam": lambda ps, **kw: SAM(ps, lr=0.05, momentum=0.9, rho=0.5, adaptive=True, **kw),
    "msam": lambda ps, **kw: MSAM(ps, lr=0.05, momentum=0.9, rho=0.05, micro_batch_size=2, **kw),
    "rwsam": lambda ps, **kw: RWSAM(ps, lr=0.05, momentum=0.9, rho=0.05, delta=1e-2, **kw),
}


@pytest.mark.parametrize("name", list(ALL))
def test_meta_parameters_are_refused_at_construction(name):
    with torch.device("meta"):
        model = dc.mlp()
    with pytest.raises(ValueError, match=r"device meta.*to_empty"):
        ALL[name](model.parameters())


def test_meta_parameters_are_refused_by_add_param_group_and_after_a_move():
    model = dc.mlp()
    opt = FSGLD(list(model[0].parameters()), lr=0.1, beta=1e6)
    with torch.device("meta"):
        lazy = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"device meta.*to_empty"):
        opt.add_param_group({"params": lazy.parameters()})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": model[2].parameters()})
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)   # .to() keeps the Parameters
    try:
        model.to("meta")   # the optimizer's parameters now hold no data: the rebuild refuses them
        with pytest.raises(ValueError, match=r"device meta.*to_empty"):
            dc.train_step("fsgld", model, opt, *dc.batch(0))
        model.to_empty(device="cpu")   # what the message says to do
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert opt.param_groups[1]["params"][0] is model[2].weight
    for m in model:
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    before = [p.detach().clone() for p in model.parameters()]
    dc.train_step("fsgld", model, opt, *dc.batch(0))
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


# --------------------------------------------------------------------------- 3. copies
def _copy(obj, how):
    if how == "deepcopy":
        return copy.deepcopy(obj)
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("name", list(ALL))
def test_a_copied_optimizer_continues_bit_identically(name, how, backend):
    model = dc.mlp()
    opt = ALL[name](model.parameters(), seed=7, backend=backend)
    for k in range(2):
        dc.train_step(name, model, opt, *dc.batch(k))
    twin = _copy({"model": model, "opt": opt}, how)   # the model's parameters are the copy's
    m2, o2 = twin["model"], twin["opt"]
    assert type(o2) is type(opt) and o2.seed == opt.seed and o2.step_count == 2
    assert all(p is q for p, q in zip(o2.param_groups[0]["params"], m2.parameters()))
    assert not any(p is q for p, q in zip(o2.param_groups[0]["params"], model.parameters()))
    if isinstance(opt, SAM):   # one set of param_groups and state, shared with the base optimizer
        assert o2.param_groups is o2.base_optimizer.param_groups
        assert o2.state is o2.base_optimizer.state
        assert o2.base_optimizer is not opt.base_optimizer
    sd, sd2 = opt.state_dict(), o2.state_dict()
    assert sd2["fused_flat"] == sd["fused_flat"]
    for i, st in sd["state"].items():
        assert torch.equal(sd2["state"][i]["momentum_buffer"], st["momentum_buffer"])
    for k in (2, 3):
        dc.train_step(name, model, opt, *dc.batch(k))
        dc.train_step(name, m2, o2, *dc.batch(k))
    for p, q in zip(model.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    assert o2.step_count == opt.step_count == 4


def test_a_copy_does_not_step_the_original_through_a_scheduler_wrapper():
    model = dc.mlp()
    opt = ALL["fsgld"](model.parameters(), seed=3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)   # wraps opt.step
    dc.train_step("fsgld", model, opt, *dc.batch(0))
    sched.step()
    twin = copy.deepcopy({"model": model, "opt": opt})
    before = [p.detach().clone() for p in model.parameters()]
    dc.train_step("fsgld", twin["model"], twin["opt"], *dc.batch(1))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert twin["opt"].step_count == 2 and opt.step_count == 1
    assert twin["opt"].param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.025


def test_a_perturbed_optimizer_cannot_be_copied():
    model = dc.mlp()
    opt = ALL["fsgld"](model.parameters(), seed=3)
    opt.perturb()
    with pytest.raises(RuntimeError, match="perturbed"):
        copy.deepcopy(opt)
    opt.restore()
    assert copy.deepcopy(opt).seed == 3


# --------------------------------------------------------------------------- 4. hyperparameters
BAD = {
    "lr": dict(lr=-1), "lr float": dict(lr=-0.5), "lr tensor": dict(lr=torch.tensor(-1.0)),
    "lr 2 elements": dict(lr=torch.tensor([0.1, 0.2])), "momentum": dict(momentum=-1),
    "weight_decay": dict(weight_decay=-1e-3), "nesterov": dict(nesterov=True),
    "nesterov dampening": dict(nesterov=True, momentum=0.9, dampening=0.1),
    "lr before momentum": dict(lr=-1, momentum=-1, weight_decay=-1),
    "momentum before weight_decay": dict(momentum=-1, weight_decay=-1),
}


@pytest.mark.parametrize("params", ["None", "model"])
@pytest.mark.parametrize("cls", [SGLD, FSGLD, RWP, SAM])
@pytest.mark.parametrize("bad", list(BAD))
def test_bad_hyperparameters_raise_what_torch_sgd_raises(bad, cls, params):
    """torch.optim.SGD checks its hyperparameters before it looks at params."""
    arg = (lambda: None) if params == "None" else (lambda: mlp().parameters())
    with pytest.raises(Exception) as want:
        torch.optim.SGD(arg(), **BAD[bad])
    with pytest.raises(Exception) as got:
        cls(arg(), **BAD[bad])
    assert type(got.value) is type(want.value) is ValueError
    assert str(got.value) == str(want.value)


# --------------------------------------------------------------------------- 5. seed broadcast
DIST_TIMEOUT = 90.0


def _launch(job: str, tmpdir: str) -> list[dict]:
    """tests/test_distributed.py's launch, for the jobs of tests/dist_idiom_cases.py."""
    from tests import dist_idiom_cases as dic
    from tests.test_distributed import launch

    return launch(job, tmpdir, DIST_TIMEOUT, worker=dic.worker)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ranks_building_different_optimizers_do_not_hang(tmp_path):
    r0, r1 = (r["seeds"] for r in _launch("pipeline", str(tmp_path)))
    assert r0["none"] == [10, 20] and r1["none"] == [11]          # no broadcast: own seeds
    assert r0["stage"] == [30, 40] and r1["stage"] == [31]        # each stage's first rank
    assert r0["group"] == r1["group"] == 50                        # the group's first rank
    assert r0["default"] == r1["default"] == 60                    # rank 0


@pytest.mark.parametrize("bad", [True, "default", 0])
def test_process_group_must_be_none_a_group_or_false(bad):
    with pytest.raises(ValueError, match="process_group"):
        FSGLD(mlp().parameters(), lr=0.1, process_group=bad)
    assert FSGLD(mlp().parameters(), lr=0.1, seed=5, process_group=False).seed == 5


# --------------------------------------------------------------------------- 6, 7. skipped steps
@pytest.fixture(params=["host", "device"])
def verdict(request, monkeypatch):
    """Where GradScaler's / the finiteness check's found_inf is read. 'device': treated as
    a device tensor (FlatOptimizer._found_inf_on_host is the one place that tells), so the
    code a CUDA run takes runs on CPU tensors: the kernels read found_inf, the host does
    not, except where that path itself reads it."""
    if request.param == "device":
        monkeypatch.setattr(FlatOptimizer, "_found_inf_on_host", staticmethod(lambda t: False))
    return request.param


def _amp_step(opt, model, scaler, k, inject: bool):
    """The GradScaler recipe (SAM's: first_step with the scaler, then scaler.step)."""
    opt.zero_grad()
    scaler.scale(loss_of(model, k)).backward()
    if isinstance(opt, SAM):
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(loss_of(model, k)).backward()
    if inject:
        next(model.parameters()).grad.view(-1)[0] = math.inf
    scaler.step(opt)
    scaler.update()


@pytest.mark.filterwarnings("ignore:.*non-finite")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dampening", [0.0, 0.5])
@pytest.mark.parametrize("name", ["SGLD", "SAM"])
def test_a_skipped_first_step_leaves_momentum_as_torch_sgd(name, dampening, backend, verdict):
    """A skipped step creates no momentum: the next step's buffer is m = d (torch.optim.SGD,
    whose step GradScaler does not call), not mu * 0 + (1 - dampening) d."""
    cfg = dict(lr=0.1, momentum=0.9, dampening=dampening)
    ref, model = mlp(), mlp()
    sgd = torch.optim.SGD(ref.parameters(), **cfg)
    opt = (SGLD(model.parameters(), beta=math.inf, backend=backend, **cfg) if name == "SGLD"
           else SAM(model.parameters(), rho=0.0, backend=backend, **cfg))
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 8) for _ in range(2)]
    for k, inject in enumerate([True, True, False, False]):
        _amp_step(sgd, ref, scalers[0], k, inject)
        _amp_step(opt, model, scalers[1], k, inject)
        if inject:
            assert not sgd.state
            bufs = [opt.state[p].get("momentum_buffer") for p in model.parameters() if p in opt.state]
            if verdict == "host" or dampening != 0:
                assert all(b is None for b in bufs)
            else:   # no host read where it cannot matter: a zero buffer gives m = d exactly
                assert all(b is None or not b.any() for b in bufs)
    assert_same_params(model, ref)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], sgd.state[q]["momentum_buffer"],
                                   rtol=1e-12, atol=1e-14)
    assert opt.skipped_steps == 2 and scalers[1].get_scale() == scalers[0].get_scale() == 2.0 ** 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_skipped_steps_counts_skips_decided_on_the_device(backend, verdict):
    model = mlp()
    opt = FSGLD(model.parameters(), lr=0.05, beta=1e6, momentum=0.9, seed=4, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for k, inject in enumerate([False, True, False, True, False]):
            opt.zero_grad()
            opt.perturb()
            scaler.scale(loss_of(model, k)).backward()
            if inject:
                next(model.parameters()).grad.view(-1)[0] = math.nan
            scaler.step(opt)
            scaler.update()
    told = [w for w in caught if "non-finite" in str(w.message)]
    # the host learns of a device-side skip only when it reads the count
    assert len(told) == (2 if verdict == "host" else 0)
    assert opt.skipped_steps == 2 and opt.step_count == 5
    sd = opt.state_dict()
    assert sd["fused_flat"]["skipped_steps"] == 2
    fresh = FSGLD(mlp().parameters(), lr=0.05, beta=1e6, momentum=0.9, backend=backend)
    fresh.load_state_dict(sd)
    assert fresh.skipped_steps == 2
    opt.skipped_steps = 0
    assert opt.skipped_steps == 0


# --------------------------------------------------------------------------- 8. sparse layouts
LAYOUTS = {
    "coo": lambda g: g.to_sparse(),
    "csr": lambda g: g.to_sparse_csr(),
    "csc": lambda g: g.to_sparse_csc(),
    "bsr": lambda g: g.to_sparse_bsr((1, 1)),
}


class ReadsAs(nn.Parameter):
    """A parameter whose ``.grad`` reads in another layout. torch 2.14's autograd and
    ``.grad`` setter give a strided parameter only strided or COO gradients; this stands
    in for whatever else leaves a compressed one there (a C++ hook, a custom kernel)."""

    layout_of_grad = None

    @property
    def grad(self):
        g = torch.Tensor.grad.__get__(self)
        return g if g is None or self.layout_of_grad is None else LAYOUTS[self.layout_of_grad](g)

    @grad.setter
    def grad(self, value):
        torch.Tensor.grad.__set__(self, value)


@pytest.mark.filterwarnings("ignore:Sparse (CSR|CSC|BSR) tensor support is in beta")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["closure", "two-call"])
@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sparse_gradient_layouts_are_refused_with_the_weights_restored(layout, exact, form, backend):
    model = mlp(torch.float32)
    model[0].weight = ReadsAs(model[0].weight.detach())
    opt = FSGLD(model.parameters(), lr=0.1, beta=1e4, momentum=0.9, seed=1, backend=backend,
                exact_restore=exact)
    step(opt, model, 0)
    before = [p.detach().clone() for p in model.parameters()]
    moms = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]

    def backward():
        opt.zero_grad()
        loss_of(model, 1).backward()
        model[0].weight.layout_of_grad = layout

    with pytest.raises(ValueError, match=r"layout torch\.sparse_\w+.*sparse gradients are not supported"):
        if form == "closure":
            opt.step(backward)
        else:
            opt.perturb()
            backward()
            opt.step()
    sigma = opt.group_sigma(opt.param_groups[0])
    for a, b in zip(model.parameters(), before):
        if exact:
            assert torch.equal(a, b)
        else:   # restored by regenerating eps: within one ulp of the perturbed value
            assert ((a - b).abs() <= torch.finfo(torch.float32).eps * (b.abs() + 6 * sigma)).all()
    assert all(torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in zip(model.parameters(), moms))
    assert opt.step_count == 1
    model[0].weight.layout_of_grad = None
    step(opt, model, 1)   # usable afterwards (not left perturbed)
    assert opt.step_count == 2


@pytest.mark.parametrize("form", ["closure", "two-call"])
def test_a_sparse_embedding_gradient_is_refused_with_the_weights_restored(form):
    emb = nn.Embedding(10, 3, sparse=True)
    opt = FSGLD(emb.parameters(), lr=0.1, beta=1e4, seed=1, exact_restore=True)
    before = emb.weight.detach().clone()
    with pytest.raises(ValueError, match="layout torch.sparse_coo.*nn.Embedding"):
        if form == "closure":
            opt.step(lambda: emb(torch.tensor([1, 2])).sum().backward())
        else:
            opt.perturb()
            emb(torch.tensor([1, 2])).sum().backward()
            opt.step()
    assert torch.equal(emb.weight, before) and opt.step_count == 0
    opt.perturb()   # not left perturbed
    opt.restore()


@pytest.mark.filterwarnings("ignore:Sparse (CSR|CSC|BSR) tensor support is in beta")
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("cls", [FSGLD, SAM])
def test_sparse_parameters_are_refused_at_construction(cls, layout):
    p = nn.Parameter(LAYOUTS[layout](torch.randn(4, 3)))
    with pytest.raises(ValueError, match=r"layout torch\.sparse_\w+: sparse parameters are not supported"):
        cls([p], lr=0.1)


@pytest.mark.filterwarnings("ignore:Sparse (CSR|CSC|BSR) tensor support is in beta")
@pytest.mark.parametrize("which", ["g1", "g2"])
def test_sam_refuses_a_csr_gradient_with_the_weights_untouched(which):
    model = mlp(torch.float32)
    model[0].weight = ReadsAs(model[0].weight.detach())
    opt = SAM(model.parameters(), lr=0.1, momentum=0.9, rho=0.05)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss_of(model, 0).backward()
    if which == "g1":
        model[0].weight.layout_of_grad = "csr"

    def closure():
        loss_of(model, 0).backward()
        model[0].weight.layout_of_grad = "csr"

    with pytest.raises(ValueError, match="layout torch.sparse_csr"):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.step_count == 0 and not opt.state


# --------------------------------------------------------------------------- 9. noise layout
@pytest.mark.parametrize("name", ["fsgld", "sam"])
def test_checkpoint_of_the_previous_noise_layout_loads_with_one_warning(name):
    model = dc.mlp()
    opt = ALL[name](model.parameters(), seed=9)
    for k in range(2):
        dc.train_step(name, model, opt, *dc.batch(k))
    sd = opt.state_dict()
    assert sd["fused_flat"]["stream"] == noise.LAYOUT_VERSION
    old = noise.LAYOUT_VERSION - 1
    sd["fused_flat"]["stream"] = old
    model2 = dc.mlp()
    other = ALL[name](model2.parameters(), seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        other.load_state_dict(sd)
    assert [str(w.message).split(": ", 1)[1] for w in caught] == [
        f"checkpoint written with noise layout {old}; continues on layout {noise.LAYOUT_VERSION}: "
        f"same law, other numbers (momentum, seed and step counter are loaded; the noise "
        f"continues from a different, statistically equivalent stream)"]
    assert other.seed == 9 and other.step_count == 2
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(other.state[q]["momentum_buffer"], opt.state[p]["momentum_buffer"])
    model2.load_state_dict(model.state_dict())
    dc.train_step(name, model2, other, *dc.batch(2))
    assert other.state_dict()["fused_flat"]["stream"] == noise.LAYOUT_VERSION
    current = other.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the current layout loads silently
        ALL[name](dc.mlp().parameters()).load_state_dict(current)
    current["fused_flat"]["stream"] = noise.LAYOUT_VERSION + 1
    with pytest.raises(ValueError, match="newer fused_flat"):
        ALL[name](dc.mlp().parameters()).load_state_dict(current)


# --------------------------------------------------------------------------- 10. rounding
SGD_CONFIGS = [
    dict(), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
    dict(momentum=0.8, dampening=0.3), dict(weight_decay=1e-2),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2), dict(maximize=True),
    dict(momentum=0.9, dampening=0.5, weight_decay=1e-3, maximize=True),
]
ROUNDING_STEPS = 10
# Measured: one step from the same (theta, m, g) differs from torch's in 5-13% of the
# elements (the kernels round theta - lr * d differently from torch's add_(d, alpha=-lr)),
# by at most 1.5 eps (|theta| + lr |g| + |step|); over 10 steps of this MLP at most
# 0.83 eps * sum_t (|theta_t| + |step_t| / (1 - mu)) (the momentum carries a rounding of
# step t into the following ones), i.e. <= 5.5 eps * max |theta| of the tensor, and none
# of the 32 cases (configs x dtypes x backends) ends bitwise equal. The bound: 2x that.
ROUNDING_C = 2.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", SGD_CONFIGS,
                         ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_sgld_at_infinite_beta_is_torch_sgd_up_to_rounding(cfg, dtype, backend):
    ref, model = mlp(dtype), mlp(dtype)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05, **cfg)
    opt = SGLD(model.parameters(), lr=0.05, beta=math.inf, backend=backend, **cfg)
    eps = torch.finfo(dtype).eps
    carry = 1.0 / (1.0 - cfg.get("momentum", 0.0))
    budget = [torch.zeros_like(p) for p in ref.parameters()]
    for k in range(ROUNDING_STEPS):
        prev = [p.detach().clone() for p in ref.parameters()]
        step(sgd, ref, k)
        step(opt, model, k)
        for b, p, p0, q in zip(budget, ref.parameters(), prev, model.parameters()):
            b += p.detach().abs() + carry * (p.detach() - p0).abs()
            assert ((q - p).abs() <= ROUNDING_C * eps * b).all(), \
                f"step {k}: {((q - p).abs() / (eps * b)).max():.3g} eps-units over the bound's unit"
