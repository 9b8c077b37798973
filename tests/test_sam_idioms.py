"""The SAM family in torch.optim's idioms: state-dict hooks, the closure contract
(``opt.step(closure)`` alone, LBFGS / Lightning loops), ``check_finite=False``, m-SAM's
verdict on a non-finite g1 on the device path, and rho=0 against torch.optim.SGD."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fused_flat
from fused_flat.nn.bn import running_stats_frozen
from fused_flat.optim import MSAM, RWSAM, SAM
from tests.conftest import cpu_backends


pytestmark = pytest.mark.usefixtures("one_thread")


def make_net(dtype=torch.float64, seed=0, bn=True):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(5, 6)] + ([torch.nn.BatchNorm1d(6)] if bn else []) + [
        torch.nn.Tanh(), torch.nn.Linear(6, 3)]
    return torch.nn.Sequential(*layers).to(dtype)


def batches(n, bs=8, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 5, generator=g, dtype=dtype), torch.randint(0, 3, (bs,), generator=g))
            for _ in range(n)]


def loss_of(net, x, y):
    return F.cross_entropy(net(x), y)


def snapshot(net):
    return [t.detach().clone() for t in net.state_dict().values()]


def assert_same(net, saved):
    for t, s in zip(net.state_dict().values(), saved):
        assert torch.equal(t, s)


# ------------------------------------------------------------------ state-dict hooks
def _langevin(cls, **kw):
    return lambda ps: cls(ps, lr=0.05, momentum=0.9, seed=1, **kw)


OPTIMIZERS = {
    "SGD": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "SAM": lambda ps: SAM(ps, lr=0.05, momentum=0.9, seed=1),
    "SAM-Adam": lambda ps: SAM(ps, base_optimizer=torch.optim.Adam, lr=0.01, seed=1),
    "MSAM": lambda ps: MSAM(ps, lr=0.05, momentum=0.9, micro_batch_size=4, seed=1),
    "RWSAM": lambda ps: RWSAM(ps, lr=0.05, momentum=0.9, delta=1e-3, seed=1),
    "SGLD": _langevin(fused_flat.SGLD, beta=1e4),
    "FSGLD": _langevin(fused_flat.FSGLD, beta=1e4),
    "RWP": lambda ps: fused_flat.RWP(ps, lr=0.05, sigma=0.01, momentum=0.9, seed=1),
}
def _with_warnings_ignored(f, *a):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return f(*a)


def _trained(name):
    """An optimizer of kind ``name`` after one step (state to save), and its model."""
    net = make_net(bn=False)
    opt = _with_warnings_ignored(OPTIMIZERS[name], list(net.parameters()))
    x, y = batches(1)[0]
    if name == "MSAM":
        opt.step(lambda mb: loss_of(net, *mb).backward(), (x, y))
    elif name == "RWSAM":
        opt.step(lambda: F.cross_entropy(net(x), y, reduction="none"))
    elif isinstance(opt, SAM):   # davda54's form
        loss_of(net, x, y).backward()
        opt.step(lambda: loss_of(net, x, y).backward())
    else:
        def closure():
            opt.zero_grad()
            loss = loss_of(net, x, y)
            loss.backward()
            return loss
        opt.step(closure)
    return opt


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_hooks_run_as_in_torch(name):
    """Pre-hook before, post-hooks with the state_dict (in place or by replacing it), in
    registration order; each hook receives the optimizer it was registered on."""
    opt = _trained(name)
    events = []
    opt.register_state_dict_pre_hook(lambda o: events.append(("pre", o is opt)))

    def add_key(o, sd):
        events.append(("post", o is opt))
        sd["extra"] = 1

    opt.register_state_dict_post_hook(add_key)
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "replaced": sorted(sd)})
    sd = opt.state_dict()
    assert events == [("pre", True), ("post", True)]
    assert sd["extra"] == 1
    assert {"extra", "param_groups", "state"} <= set(sd["replaced"])   # after the first post-hook
    if name != "SGD":
        assert "fused_flat" in sd


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_post_hook_sees_the_returned_state_dict(name):
    opt = _trained(name)
    seen = []
    opt.register_state_dict_post_hook(lambda o, sd: seen.append((sd, sorted(sd))))
    sd = opt.state_dict()
    assert len(seen) == 1 and seen[0][0] is sd and seen[0][1] == sorted(sd)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_load_state_dict_hooks_run_as_in_torch(name):
    """The load pre-hook gets a shallow copy (the caller's dict is left alone) and its
    edits, or the dict it returns, are what is loaded; the post-hook runs after the load."""
    opt = _trained(name)
    sd = opt.state_dict()
    lr0 = sd["param_groups"][0]["lr"]
    events = []

    def edit(o, d):
        events.append(("pre", o is opt, d is not sd))
        d["param_groups"] = [dict(g, lr=0.123) for g in d["param_groups"]]

    opt.register_load_state_dict_pre_hook(edit)
    opt.register_load_state_dict_post_hook(lambda o: events.append(("post", o.param_groups[0]["lr"])))
    _with_warnings_ignored(opt.load_state_dict, sd)
    assert events == [("pre", True, True), ("post", 0.123)]
    assert opt.param_groups[0]["lr"] == 0.123 and sd["param_groups"][0]["lr"] == lr0

    opt.register_load_state_dict_pre_hook(
        lambda o, d: {**d, "param_groups": [dict(g, lr=0.5) for g in d["param_groups"]]})
    _with_warnings_ignored(opt.load_state_dict, sd)
    assert opt.param_groups[0]["lr"] == 0.5   # the replacement, after the in-place edit


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_load_pre_hook_runs_before_the_checks(name):
    """A pre-hook may turn a dict the optimizer would refuse into a loadable one (torch runs
    it before validating), e.g. one saved under other keys."""
    opt = _trained(name)
    sd = opt.state_dict()
    legacy = {"legacy": sd}
    opt.register_load_state_dict_pre_hook(lambda o, d: d["legacy"] if "legacy" in d else None)
    _with_warnings_ignored(opt.load_state_dict, legacy)
    fresh = _with_warnings_ignored(OPTIMIZERS[name], list(make_net(bn=False).parameters()))
    with pytest.raises((ValueError, KeyError)):   # without the hook: refused
        fresh.load_state_dict(legacy)


@pytest.mark.parametrize("name", ["SAM", "SAM-Adam", "MSAM", "RWSAM"])
def test_base_optimizer_hooks_keep_running(name):
    opt = _trained(name)
    events = []
    base = opt.base_optimizer
    base.register_state_dict_pre_hook(lambda o: events.append(("base pre", o is base)))
    base.register_state_dict_post_hook(lambda o, sd: events.append(("base post", o is base)))
    opt.register_state_dict_pre_hook(lambda o: events.append(("pre", o is opt)))
    opt.register_state_dict_post_hook(lambda o, sd: events.append(("post", o is opt)))
    base.register_load_state_dict_pre_hook(lambda o, d: events.append(("base load pre", o is base)))
    base.register_load_state_dict_post_hook(lambda o: events.append(("base load post", o is base)))
    opt.register_load_state_dict_pre_hook(lambda o, d: events.append(("load pre", o is opt)))
    opt.register_load_state_dict_post_hook(lambda o: events.append(("load post", o is opt)))
    opt.load_state_dict(opt.state_dict())
    assert events == [("pre", True), ("base pre", True), ("base post", True), ("post", True),
                      ("load pre", True), ("base load pre", True), ("base load post", True),
                      ("load post", True)]


# ------------------------------------------------------------------ the closure contract
VARIANTS = {"sam": dict(rho=0.1), "asam": dict(adaptive=True, rho=0.5), "usam": dict(normalize=False)}
SGD_CFG = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)


def two_call_form(net, opt, data):
    """davda54/sam's explicit form; returns the first-pass losses."""
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = loss_of(net, x, y)
        loss.backward()
        losses.append(loss.detach())
        opt.first_step(zero_grad=True)
        with running_stats_frozen(net):
            loss_of(net, x, y).backward()
        opt.second_step(zero_grad=True)
    return losses


def torch_closure(net, opt, x, y):
    def closure():   # torch.optim's docs / LBFGS
        opt.zero_grad()
        loss = loss_of(net, x, y)
        loss.backward()
        return loss
    return closure


def lightning_closure(net, opt, x, y):
    def closure():   # Lightning's automatic optimization: forward, zero_grad, backward
        loss = loss_of(net, x, y)
        opt.zero_grad()
        loss.backward()
        return loss
    return closure


def bare_closure(net, opt, x, y):
    return lambda: loss_of(net, x, y).backward()   # davda54's closure, no zero_grad, no loss


CLOSURES = {"torch": torch_closure, "lightning": lightning_closure, "bare": bare_closure}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("style", list(CLOSURES))
def test_closure_driven_loop_equals_two_call_form(style, variant, backend):
    """``opt.step(closure)`` alone, step after step (the gradients the last step left are
    no g1): the closure computes g1 at theta (BN statistics updated) and g2 at the
    perturbed point (frozen); bitwise the two-call form. Returns the first loss; a closure
    without zero_grad works too (the step zeroes before each call)."""
    data = batches(4)
    net, twin = make_net(), make_net()
    opt = SAM(net.parameters(), backend=backend, seed=1, **VARIANTS[variant], **SGD_CFG)
    ref = SAM(twin.parameters(), backend=backend, seed=1, **VARIANTS[variant], **SGD_CFG)
    got = [opt.step(closure=CLOSURES[style](net, opt, x, y)) for x, y in data]
    want = two_call_form(twin, ref, data)
    if style == "bare":
        assert got == [None] * len(data)   # what the closure returned
    else:
        assert all(torch.equal(a.detach(), b) for a, b in zip(got, want))   # the loss at theta
    for a, b in zip(net.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)   # weights and BN statistics (updated once per step)
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])
    assert opt.step_count == len(data)
    assert all(p.grad is not None for p in net.parameters())   # g2 left, as torch leaves grads


@pytest.mark.parametrize("zero", ["none", "zeros"])
def test_davda54_form_unchanged(zero):
    """The caller's backward (also into zeroed, not freed, gradients) is g1, the closure
    gives g2, the closure's return value is returned: the two-call form, bitwise."""
    data = batches(4)
    net, twin = make_net(), make_net()
    opt, ref = (SAM(n.parameters(), rho=0.1, seed=1, **SGD_CFG) for n in (net, twin))
    for x, y in data:
        opt.zero_grad(set_to_none=(zero == "none"))
        loss_of(net, x, y).backward()
        assert opt.step(lambda: loss_of(net, x, y).backward() or "g2") == "g2"
    two_call_form(twin, ref, data)
    for a, b in zip(net.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)


def test_torch_form_after_zeroing_in_place_is_still_torch_form():
    """``opt.zero_grad(set_to_none=False)`` then ``opt.step(closure)``: zeroed gradients are
    no g1 (a g1 of zeros would make e = 0 and the step plain SGD, silently): the closure
    computes g1, bitwise the two-call form."""
    data = batches(4)
    net, twin = make_net(), make_net()
    opt, ref = (SAM(n.parameters(), rho=0.1, seed=1, **SGD_CFG) for n in (net, twin))
    for x, y in data:
        opt.zero_grad(set_to_none=False)
        opt.step(torch_closure(net, opt, x, y))
    two_call_form(twin, ref, data)
    for a, b in zip(net.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)


def test_closure_without_backward_is_an_error_and_changes_nothing():
    net = make_net(bn=False)
    opt = SAM(net.parameters(), lr=0.1)
    saved = snapshot(net)
    x, y = batches(1)[0]
    with pytest.raises(RuntimeError, match="no gradient"):
        opt.step(lambda: loss_of(net, x, y))
    assert_same(net, saved)
    assert opt.step_count == 0 and not opt._is_perturbed()


def test_closure_error_on_second_pass_restores_exactly():
    net = make_net()
    opt = SAM(net.parameters(), lr=0.1, momentum=0.9)
    x, y = batches(1)[0]
    saved = snapshot(net)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("data loader died")
        opt.zero_grad()
        loss = loss_of(net, x, y)
        loss.backward()
        return loss

    with pytest.raises(KeyError):
        opt.step(closure)
    params = dict(net.named_parameters())
    for (k, t), s in zip(net.state_dict().items(), saved):
        if k in params:
            assert torch.equal(t, s)   # BN statistics did take the first pass, as in SGD
    assert opt.step_count == 0 and not opt.state


# ------------------------------------------------------------------ non-finite g1
def ref_step(net, x, y, rho, lr, inject):
    """davda54/sam's arithmetic with torch.optim.SGD, g1 edited by ``inject``."""
    sgd = torch.optim.SGD(net.parameters(), lr=lr)
    loss_of(net, x, y).backward()
    inject(net)
    with torch.no_grad():
        ps = list(net.parameters())
        norm = torch.norm(torch.stack([p.grad.norm(2) for p in ps]), 2)
        old = [p.clone() for p in ps]
        for p in ps:
            p.add_(p.grad * (rho / (norm + 1e-12)))
    sgd.zero_grad()
    with running_stats_frozen(net):
        loss_of(net, x, y).backward()
    with torch.no_grad():
        for p, o in zip(ps, old):
            p.copy_(o)
    sgd.step()


def _inject(value):
    def f(net):
        next(net.parameters()).grad.view(-1)[1] = value
    return f


def _device_path(monkeypatch, path):
    """'device': first_step keeps g1's norm and verdict in tensors, as on CUDA (and in a
    compiled step), on these CPU tensors."""
    if path == "device":
        monkeypatch.setattr(SAM, "_norm_on_host", staticmethod(lambda buckets: False))


@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_g1_without_check_is_plain_arithmetic(value, backend, path, monkeypatch):
    _device_path(monkeypatch, path)
    x, y = batches(1)[0]
    net, twin = make_net(), make_net()
    opt = SAM(net.parameters(), rho=0.1, lr=0.1, check_finite=False, backend=backend, seed=1)
    loss_of(net, x, y).backward()
    _inject(value)(net)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no "non-finite ... skipped" warning
        opt.step(bare_closure(net, opt, x, y))
    ref_step(twin, x, y, 0.1, 0.1, _inject(value))
    assert opt.skipped_steps == 0 and not opt.last_step_skipped
    assert any(not torch.isfinite(p).all() for p in twin.parameters())   # not a skip
    for a, b in zip(net.state_dict().values(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0, equal_nan=True)


@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_g1_with_check_skips(value, backend, path, monkeypatch):
    _device_path(monkeypatch, path)
    data = batches(2)
    net = make_net()
    opt = SAM(net.parameters(), rho=0.1, lr=0.1, momentum=0.9, backend=backend, seed=1)
    for i, (x, y) in enumerate(data):
        if i == 1:
            saved = snapshot(net)
            moms = [opt.state[p]["momentum_buffer"].clone() for p in net.parameters()]
        opt.zero_grad()
        loss_of(net, x, y).backward()
        if i == 1:
            _inject(value)(net)
            with pytest.warns(RuntimeWarning, match="non-finite"):
                opt.step(bare_closure(net, opt, x, y))
        else:
            opt.step(bare_closure(net, opt, x, y))
    assert opt.skipped_steps == 1 and opt.last_step_skipped
    params = dict(net.named_parameters())
    for (k, t), s in zip(net.state_dict().items(), saved):
        if k in params:
            assert torch.equal(t, s)
    for p, m in zip(net.parameters(), moms):
        assert torch.equal(opt.state[p]["momentum_buffer"], m)


# ------------------------------------------------------------------ m-SAM, non-finite g1
@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("bad", [0, 2])
def test_msam_nonfinite_g1_in_one_micro_batch_skips(bad, backend, path, monkeypatch):
    """Gradients written by hand (g2 independent of the weights, so g2 stays finite even
    where the NaN perturbation reached the weights): the g1 verdict of micro-batch ``bad``
    alone must skip the update."""
    _device_path(monkeypatch, path)
    net = make_net(bn=False)
    params = list(net.parameters())
    opt = MSAM(params, rho=0.1, lr=0.1, momentum=0.9, micro_batch_size=2, backend=backend, seed=1)
    calls = []

    def closure(mb):
        k = len(calls)
        calls.append(k)
        for i, p in enumerate(params):
            g = torch.full_like(p, float(mb.sum()) + i + 0.25 * (k % 2))
            if k == 2 * bad and nan_step[0]:
                g.view(-1)[0] = math.nan
            p.grad = g if p.grad is None else p.grad + g
        return mb.sum()

    nan_step = [False]
    x = torch.arange(6, dtype=torch.float64).reshape(6, 1)
    opt.step(closure, x)                          # a healthy step: momentum exists
    saved = [p.detach().clone() for p in params]
    moms = [opt.state[p]["momentum_buffer"].clone() for p in params]
    calls.clear()
    nan_step[0] = True
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(closure, x)
    assert len(calls) == 6 and opt.skipped_steps == 1 and opt.last_step_skipped
    for p, s, m in zip(params, saved, moms):
        assert torch.equal(p.detach(), s)
        assert torch.equal(opt.state[p]["momentum_buffer"], m)
    calls.clear()
    nan_step[0] = False
    opt.step(closure, x)                           # and training goes on
    assert opt.skipped_steps == 1
    assert all(not torch.equal(p.detach(), s) for p, s in zip(params, saved))


# ------------------------------------------------------------------ rho = 0 is torch.optim.SGD
SGD_CONFIGS = [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.3),
    dict(momentum=0.9, nesterov=True),
    dict(weight_decay=1e-2),
    dict(momentum=0.9, weight_decay=1e-2),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    dict(maximize=True),
    dict(momentum=0.9, dampening=0.5, weight_decay=1e-2, maximize=True),
]


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units in the last place of b."""
    ulp = torch.nextafter(b.abs(), torch.tensor(math.inf, dtype=b.dtype)) - b.abs()
    return (a - b).abs() / ulp


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", SGD_CONFIGS,
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_rho_zero_agrees_with_torch_sgd(cfg, dtype, backend):
    """SAM(rho=0) around torch.optim.SGD is SGD up to rounding: the fused update computes
    theta - lr * d (two roundings) where torch's add_(d, alpha=-lr) may fuse to one FMA, so
    each step may differ by about one ulp of |theta| + lr |d|; the gradient then sees the
    difference. Bound per element after K steps: 4 eps * sum_k (|theta_k| + lr |d_k|),
    from the SGD trajectory (lr d_k = theta_k - theta_{k+1}): one eps for the update and
    up to three for torch's other alpha-adds (weight decay, momentum, nesterov) each step.
    Measured here: no case bitwise equal, at most 3.3 eps (|theta| + lr |d|) apart after
    10 steps (1 step: under 1), an eighth of the bound."""
    data = batches(10, dtype=dtype)
    net, twin = make_net(dtype, bn=False), make_net(dtype, bn=False)
    opt = SAM(net.parameters(), rho=0.0, lr=0.05, backend=backend, seed=1, **cfg)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.05, **cfg)
    eps = torch.finfo(dtype).eps
    budget = [torch.zeros_like(p) for p in twin.parameters()]
    for x, y in data:
        opt.zero_grad()
        loss_of(net, x, y).backward()
        opt.step(bare_closure(net, opt, x, y))
        before = [p.detach().clone() for p in twin.parameters()]
        sgd.zero_grad()
        loss_of(twin, x, y).backward()
        sgd.step()
        for b, p, q in zip(budget, before, twin.parameters()):
            b += 4 * eps * (p.abs() + (q.detach() - p).abs())
    for p, q, b in zip(net.parameters(), twin.parameters(), budget):
        assert torch.isfinite(p).all()
        assert ((p.detach() - q.detach()).abs() <= b).all(), (
            f"max {float(_ulps(p.detach(), q.detach()).max()):.1f} ulp")


def test_copy_and_pickle_after_a_closure_step():
    """What step(closure) keeps about the gradients it left (weak references, which do
    not pickle) does not stop deepcopy / pickle."""
    import copy
    import pickle

    net = make_net()
    opt = SAM(net.parameters(), rho=0.1, seed=1, **SGD_CFG)
    x, y = batches(1)[0]
    opt.step(torch_closure(net, opt, x, y))
    pickle.loads(pickle.dumps(opt))
    twin = copy.deepcopy(opt)
    assert twin.step_count == opt.step_count
