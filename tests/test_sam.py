"""SAM / ASAM / USAM / m-SAM / RW-SAM against a straightforward unfused davda54/sam-style
reference written here, on a small float64 CNN with BatchNorm."""
import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import fused_flat.optim.sam as sam_mod
from fused_flat import noise
from fused_flat.optim import MSAM, RWSAM, SAM, choose_delta
from fused_flat.nn.bn import running_stats_frozen
from tests.conftest import cpu_backends

STEPS = 10


pytestmark = pytest.mark.usefixtures("one_thread")
TOL = dict(rtol=1e-10, atol=1e-12)   # float64 round-off over 10 steps


def make_net(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(64, 5))
    return net.to(dtype)


def batches(n=STEPS, bs=8, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, 6, 6, generator=g, dtype=dtype), torch.randint(0, 5, (bs,), generator=g))
            for _ in range(n)]


def loss_of(net, x, y):
    return F.cross_entropy(net(x), y)


class RefSAM:
    """davda54/sam, written the obvious way: per-tensor norms, a dict of old weights,
    torch.optim base optimizer; BN buffers saved/restored around the perturbed pass."""

    def __init__(self, params, base=torch.optim.SGD, rho=0.05, adaptive=False, normalize=True,
                 eta=None, **kw):
        self.params = list(params)
        self.rho, self.adaptive, self.normalize = rho, adaptive, normalize
        self.eta = eta or {}   # {param: ASAM offset}
        self.base = base(self.params, **kw)
        self.old = {}

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def first_step(self, scale=1.0):
        gs = [p for p in self.params if p.grad is not None]
        t = {p: (p.abs() + self.eta.get(p, 0.0) if self.adaptive else 1.0) for p in gs}
        norm = torch.norm(torch.stack([(t[p] * p.grad * scale).norm(2) for p in gs]), 2)
        for p in gs:
            self.old[p] = p.clone()
            coef = self.rho / (norm + 1e-12) if self.normalize else self.rho
            p.add_(t[p] ** 2 * p.grad * scale * coef)

    @torch.no_grad()
    def restore(self):
        for p, old in self.old.items():
            p.copy_(old)
        self.old = {}

    def second_step(self):
        self.restore()
        self.base.step()


def frozen_ref(net):
    """The reference's BN freezing: save and restore the buffers (independent of fused_flat.nn.bn)."""
    class Ctx:
        def __enter__(self):
            self.saved = {k: v.clone() for k, v in net.named_buffers()}

        def __exit__(self, *a):
            with torch.no_grad():
                for k, v in net.named_buffers():
                    v.copy_(self.saved[k])
    return Ctx()


def run_ref(net, ref, data, clip=None):
    for x, y in data:
        ref.zero_grad()
        loss_of(net, x, y).backward()
        ref.first_step()
        ref.zero_grad()
        with frozen_ref(net):
            loss_of(net, x, y).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        ref.second_step()


def run_ours(net, opt, data):
    for x, y in data:
        opt.zero_grad()
        loss_of(net, x, y).backward()
        opt.step(lambda: loss_of(net, x, y).backward())


def assert_models_close(a, b, **tol):
    tol = tol or TOL
    for (n1, t1), (n2, t2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert n1 == n2
        if t1.dtype == torch.int64:
            assert torch.equal(t1, t2), n1
        else:
            torch.testing.assert_close(t1, t2, **tol, msg=lambda m: f"{n1}: {m}")


VARIANTS = {"sam": dict(), "asam": dict(adaptive=True, rho=0.5), "usam": dict(normalize=False, rho=0.05)}
SGD_CFG = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_reference(variant, backend):
    data = batches()
    net, twin = make_net(), make_net()
    opt = SAM(net.parameters(), backend=backend, **VARIANTS[variant], **SGD_CFG)
    ref = RefSAM(twin.parameters(), **{"rho": 0.05, **VARIANTS[variant]}, **SGD_CFG)
    ptrs = [p.data_ptr() for p in net.parameters()]
    run_ours(net, opt, data)
    run_ref(twin, ref, data)
    assert_models_close(net, twin)
    assert [p.data_ptr() for p in net.parameters()] == ptrs          # no storage change
    assert int(net[1].num_batches_tracked) == STEPS                   # BN updated once per step
    for p, q in zip(net.parameters(), twin.parameters()):             # momentum in the state
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref.base.state[q]["momentum_buffer"], **TOL)


@pytest.mark.parametrize("cfg", [dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
                                 dict(lr=0.05, momentum=0.8, dampening=0.25),
                                 dict(lr=0.05, maximize=True)])
def test_sgd_options_match_reference(cfg):
    data = batches(4)
    net, twin = make_net(), make_net()
    opt = SAM(net.parameters(), rho=0.1, **cfg)
    ref = RefSAM(twin.parameters(), rho=0.1, **cfg)
    run_ours(net, opt, data)
    run_ref(twin, ref, data)
    assert_models_close(net, twin)


@pytest.mark.parametrize("backend", cpu_backends())
def test_asam_eta_for_biases_in_their_own_group(backend):
    data = batches(4)
    net, twin = make_net(), make_net()
    split = lambda m: ([p for n, p in m.named_parameters() if n.endswith("weight")],   # noqa: E731
                       [p for n, p in m.named_parameters() if n.endswith("bias")])
    w, b = split(net)
    opt = SAM([{"params": w}, {"params": b, "adaptive_eta": 0.01}], adaptive=True, backend=backend,
              **SGD_CFG)
    w2, b2 = split(twin)
    ref = RefSAM(w2 + b2, rho=2.0, adaptive=True, eta={p: 0.01 for p in b2}, **SGD_CFG)
    run_ours(net, opt, data)
    run_ref(twin, ref, data)
    assert_models_close(net, twin)
    no_eta = make_net()
    run_ours(no_eta, SAM(no_eta.parameters(), adaptive=True, **SGD_CFG), data)
    assert not torch.allclose(no_eta[4].bias, net[4].bias, rtol=1e-6, atol=0)   # eta matters


def test_rho_defaults():
    net = make_net()
    assert SAM(net.parameters()).param_groups[0]["rho"] == 0.05
    assert SAM(make_net().parameters(), adaptive=True).param_groups[0]["rho"] == 2.0
    assert SAM(make_net().parameters(), normalize=False).param_groups[0]["rho"] == 0.05


def test_rho_zero_is_sgd_including_bn_buffers():
    data = batches()
    net, twin = make_net(), make_net()
    opt = SAM(net.parameters(), rho=0.0, **SGD_CFG)
    sgd = torch.optim.SGD(twin.parameters(), **SGD_CFG)
    run_ours(net, opt, data)
    for x, y in data:
        sgd.zero_grad()
        loss_of(twin, x, y).backward()
        sgd.step()
    assert_models_close(net, twin, rtol=0, atol=1e-14)


def test_without_freeze_bn_stats_update_twice():
    net = make_net()
    opt = SAM(net.parameters(), freeze_bn=False, lr=0.1)
    run_ours(net, opt, batches(3))
    assert int(net[1].num_batches_tracked) == 6


def test_two_call_form_with_clipping_of_g2():
    data = batches(5)
    net, twin = make_net(), make_net()
    opt = SAM(net.parameters(), rho=0.1, **SGD_CFG)
    ref = RefSAM(twin.parameters(), rho=0.1, **SGD_CFG)
    for x, y in data:
        loss_of(net, x, y).backward()
        opt.first_step(zero_grad=True)
        with running_stats_frozen(net):
            loss_of(net, x, y).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.05)   # clipping is active (norms ~1)
        opt.second_step(zero_grad=True)
    run_ref(twin, ref, data, clip=0.05)
    assert_models_close(net, twin)


def test_gradient_accumulation():
    data = batches(4, bs=8)
    net, twin = make_net(), make_net()
    opt = SAM(net.parameters(), rho=0.1, **SGD_CFG)
    ref = RefSAM(twin.parameters(), rho=0.1, **SGD_CFG)
    for x, y in data:
        for xs, ys in zip(x.split(4), y.split(4)):
            (loss_of(net, xs, ys) / 2).backward()
        opt.first_step(zero_grad=True)
        with running_stats_frozen(net):
            for xs, ys in zip(x.split(4), y.split(4)):
                (loss_of(net, xs, ys) / 2).backward()
        opt.second_step(zero_grad=True)
        ref.zero_grad()
        for xs, ys in zip(x.split(4), y.split(4)):
            (loss_of(twin, xs, ys) / 2).backward()
        ref.first_step()
        ref.zero_grad()
        with frozen_ref(twin):
            for xs, ys in zip(x.split(4), y.split(4)):
                (loss_of(twin, xs, ys) / 2).backward()
        ref.second_step()
    assert_models_close(net, twin)


def test_non_sgd_base_optimizer_falls_back_with_one_warning():
    sam_mod._warned_unfused = False
    data = batches(4)
    net, twin = make_net(), make_net()
    with pytest.warns(UserWarning, match="SGD-only"):
        opt = SAM(net.parameters(), base_optimizer=torch.optim.Adam, rho=0.1, lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SAM(make_net().parameters(), base_optimizer=torch.optim.Adam, lr=1e-2)   # no second warning
    ref = RefSAM(twin.parameters(), base=torch.optim.Adam, rho=0.1, lr=1e-2)
    run_ours(net, opt, data)
    run_ref(twin, ref, data)
    assert_models_close(net, twin)
    assert "exp_avg" in opt.state_dict()["state"][0]


def test_lr_scheduler_attaches_to_sam():
    net = make_net()
    opt = SAM(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = batches(1)[0]
    run_ours(net, opt, [(x, y)])
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.05
    assert opt.base_optimizer.param_groups[0] is opt.param_groups[0]


def test_lr_scheduler_two_call_form_no_order_warning():
    net = make_net()
    opt = SAM(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = batches(1)[0]
    loss_of(net, x, y).backward()
    opt.first_step(zero_grad=True)
    loss_of(net, x, y).backward()
    opt.second_step(zero_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # "lr_scheduler.step() before optimizer.step()"
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.05


def test_save_resume_bitwise():
    data = batches()
    net = make_net()
    opt = SAM(net.parameters(), rho=0.1, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    run_ours(net, opt, data[:6])
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    run_ours(net, opt, data[6:])
    buf.seek(0)
    ck = torch.load(buf)
    net2 = make_net(seed=5)
    net2.load_state_dict(ck["model"])
    opt2 = SAM(net2.parameters(), rho=0.7, lr=1.0, momentum=0.9, nesterov=True)   # overwritten by the load
    opt2.load_state_dict(ck["opt"])
    assert opt2.step_count == 6 and opt2.param_groups[0]["rho"] == 0.1
    run_ours(net2, opt2, data[6:])
    for t1, t2 in zip(net.state_dict().values(), net2.state_dict().values()):
        assert torch.equal(t1, t2)
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[q]["momentum_buffer"])


def test_msam_with_m_equal_batch_is_sam():
    data = batches(5)
    net, twin = make_net(), make_net()
    opt = MSAM(net.parameters(), micro_batch_size=8, rho=0.1, **SGD_CFG)
    sam = SAM(twin.parameters(), rho=0.1, **SGD_CFG)
    for x, y in data:
        opt.step(lambda mb: loss_of(net, *mb).backward(), (x, y))
    run_ours(twin, sam, data)
    assert_models_close(net, twin)


def test_msam_matches_reference_micro_batches():
    data = batches(4, bs=8)
    net, twin = make_net(), make_net()
    opt = MSAM(net.parameters(), micro_batch_size=3, rho=0.1, **SGD_CFG)   # 3 + 3 + 2
    ref = RefSAM(twin.parameters(), rho=0.1, **SGD_CFG)
    for x, y in data:
        opt.step(lambda mb: loss_of(net, *mb).backward(), (x, y))
        acc = [torch.zeros_like(p) for p in twin.parameters()]
        for xs, ys in zip(x.split(3), y.split(3)):
            ref.zero_grad()
            loss_of(twin, xs, ys).backward()
            ref.first_step()
            ref.zero_grad()
            with frozen_ref(twin):
                loss_of(twin, xs, ys).backward()
            for a, p in zip(acc, twin.parameters()):
                a.add_(p.grad, alpha=len(xs) / len(x))
            ref.restore()
        for a, p in zip(acc, twin.parameters()):
            p.grad = a
        ref.base.step()
    assert_models_close(net, twin)


def per_sample(net, x, y):
    return lambda: F.cross_entropy(net(x), y, reduction="none")


def test_rwsam_lam_zero_is_sam():
    data = batches(5)
    net, twin = make_net(), make_net()
    opt = RWSAM(net.parameters(), delta=1e-3, lam=0.0, rho=0.1, **SGD_CFG)
    sam = SAM(twin.parameters(), rho=0.1, **SGD_CFG)
    for x, y in data:
        opt.step(per_sample(net, x, y))
    run_ours(twin, sam, data)
    assert_models_close(net, twin)
    assert int(net[1].num_batches_tracked) == 5


@pytest.mark.parametrize("backend", cpu_backends())
def test_rwsam_weights_and_step_match_reference(backend):
    x, y = batches(1)[0]
    net, twin = make_net(), make_net()
    opt = RWSAM(net.parameters(), delta=1e-4, lam=0.5, rho=0.1, seed=1234, backend=backend, lr=0.1)
    opt.step(per_sample(net, x, y))
    # reference: v from the noise stream (one bucket, elements in parameter order)
    params = list(twin.parameters())
    with torch.no_grad():
        l0 = F.cross_entropy(twin(x), y, reduction="none")
    twin.load_state_dict(make_net().state_dict())      # undo the BN update of that forward
    saved = [p.detach().clone() for p in params]
    off = 0
    with torch.no_grad():
        for p in params:
            p.add_(1e-4 * noise.rademacher(1234, 0, 0, off, p.numel()).double().view_as(p))
            off += p.numel()
        with frozen_ref(twin):
            l1 = F.cross_entropy(twin(x), y, reduction="none")
        for p, s in zip(params, saved):
            p.copy_(s)
    ghat2 = ((l1 - l0) / 1e-4) ** 2
    p_ref = torch.softmax(0.5 * ghat2 / ghat2.mean(), 0)
    torch.testing.assert_close(opt.last_weights, p_ref, rtol=1e-5, atol=1e-7)
    assert p_ref.std() > 1e-3                                # the weights are not uniform
    ref = RefSAM(params, rho=0.1, lr=0.1)
    (p_ref * F.cross_entropy(twin(x), y, reduction="none")).sum().backward()
    ref.first_step()
    ref.zero_grad()
    with frozen_ref(twin):
        loss_of(twin, x, y).backward()
    ref.second_step()
    assert_models_close(net, twin, rtol=1e-6, atol=1e-8)
    assert opt.state_dict()["fused_flat"]["seed"] == 1234


def test_rwsam_seed_default_follows_torch_manual_seed():
    torch.manual_seed(3)
    s1 = RWSAM(make_net().parameters(), delta=1e-3).seed
    torch.manual_seed(3)
    s2 = RWSAM(make_net().parameters(), delta=1e-3).seed
    assert s1 == s2 and 0 <= s1 < 2 ** 63


def test_choose_delta():
    net = make_net()
    x, y = batches(1)[0]
    before = copy.deepcopy(net.state_dict())
    best, errors = choose_delta(net, per_sample(net, x, y), candidates=(1e-1, 1e-6, 1e-15))
    # truncation error dominates at 1e-1, cancellation at 1e-15 (float64)
    assert best == 1e-6 and errors[1e-6] < 1e-4 and errors[1e-1] > 1e-2 and errors[1e-15] > 1e-3
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------ AMP (GradScaler on CPU)
@pytest.mark.parametrize("variant", ["sam", "usam"])
def test_grad_scaler_recipe_equals_unscaled(variant):
    """Scale 2^8 with autocast off: every scaled/unscaled value is exact, so the recipe must
    reproduce plain SAM (USAM would not, if g1 were not unscaled)."""
    data = batches(4, dtype=torch.float32)
    net, twin = make_net(torch.float32), make_net(torch.float32)
    kw = dict(VARIANTS[variant], **SGD_CFG)
    opt, plain = SAM(net.parameters(), **kw), SAM(twin.parameters(), **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1000)
    for x, y in data:
        scaler.scale(loss_of(net, x, y)).backward()
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        with running_stats_frozen(net):
            scaler.scale(loss_of(net, x, y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    run_ours(twin, plain, data)
    assert_models_close(net, twin, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("where", ["first", "second"])
def test_grad_scaler_bf16_injected_inf_skips_step(where):
    data = batches(3, dtype=torch.float32)
    net = make_net(torch.float32)
    opt = SAM(net.parameters(), rho=0.05, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)

    def amp_step(x, y, inject=None):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(net, x, y)
        scaler.scale(loss).backward()
        if inject == "first":
            next(net.parameters()).grad.view(-1)[0] = math.inf
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        with torch.autocast("cpu", dtype=torch.bfloat16), running_stats_frozen(net):
            loss2 = loss_of(net, x, y)
        scaler.scale(loss2).backward()
        if inject == "second":
            next(net.parameters()).grad.view(-1)[0] = math.inf
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()

    amp_step(*data[0])
    params = [p.detach().clone() for p in net.parameters()]
    moms = [opt.state[p]["momentum_buffer"].clone() for p in net.parameters()]
    scale = scaler.get_scale()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        amp_step(*data[1], inject=where)
    assert opt.skipped_steps == 1
    for p, q, m in zip(net.parameters(), params, moms):
        assert torch.equal(p.detach(), q)
        assert torch.equal(opt.state[p]["momentum_buffer"], m)
    if where == "second":
        assert scaler.get_scale() == scale / 2
    amp_step(*data[2])                                    # training goes on
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(p.detach(), q) for p, q in zip(net.parameters(), params))


def test_nonfinite_without_scaler_skips():
    net = make_net()
    opt = SAM(net.parameters(), lr=0.1, momentum=0.9)
    x, y = batches(1)[0]
    before = [p.detach().clone() for p in net.parameters()]
    loss_of(net, x, y).backward()

    def closure():
        loss_of(net, x, y).backward()
        next(net.parameters()).grad.view(-1)[0] = math.nan
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(closure)
    assert all(torch.equal(p.detach(), q) for p, q in zip(net.parameters(), before))


# ------------------------------------------------------------------ errors
def test_clear_errors():
    net = make_net()
    with pytest.raises(ValueError, match="rho"):
        SAM(net.parameters(), rho=-0.1)
    with pytest.raises(ValueError, match="adaptive_eta"):
        SAM(make_net().parameters(), adaptive=True, adaptive_eta=-1.0)
    with pytest.raises(ValueError, match="normalize=True"):
        SAM(make_net().parameters(), adaptive=True, normalize=False)
    with pytest.raises(TypeError, match="Optimizer class"):
        SAM(make_net().parameters(), base_optimizer=torch.optim.SGD(make_net().parameters(), lr=0.1))
    with pytest.raises(ValueError, match="backend 'cuda'"):
        SAM(make_net().parameters(), backend="cuda")     # CPU tensors (or no CUDA build)
    opt = SAM(net.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="computed no gradient"):
        opt.step(lambda: None)   # the closure-driven form: the closure must call backward()
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()
    with pytest.raises(ValueError, match="micro_batch_size"):
        MSAM(make_net().parameters(), micro_batch_size=0)
    with pytest.raises(ValueError, match="delta"):
        RWSAM(make_net().parameters(), delta=0.0)
    rw = RWSAM(make_net().parameters(), delta=1e-3)
    with pytest.raises(ValueError, match="per-sample"):
        rw.step(lambda: torch.tensor(1.0, requires_grad=True))


def test_rwsam_save_resume_bitwise():
    data = batches(6)
    net = make_net()
    opt = RWSAM(net.parameters(), delta=1e-3, lam=0.5, lr=0.05, momentum=0.9)   # seed from torch
    for x, y in data[:3]:
        opt.step(per_sample(net, x, y))
    ck = copy.deepcopy({"model": net.state_dict(), "opt": opt.state_dict()})
    for x, y in data[3:]:
        opt.step(per_sample(net, x, y))
    net2 = make_net()
    net2.load_state_dict(ck["model"])
    opt2 = RWSAM(net2.parameters(), delta=1e-3, lam=0.5, lr=0.05, momentum=0.9, seed=99)
    opt2.load_state_dict(ck["opt"])
    assert opt2.seed == opt.seed and opt2.step_count == 3
    for x, y in data[3:]:
        opt2.step(per_sample(net2, x, y))
    for t1, t2 in zip(net.state_dict().values(), net2.state_dict().values()):
        assert torch.equal(t1, t2)
    assert torch.equal(opt.last_weights, opt2.last_weights)


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="runs the Triton SAM kernels on CPU tensors (interpreter)")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_triton_backend_optimizer_matches_reference(variant):
    """The optimizer on the Triton multi-tensor SAM kernels (one launch per bucket and pass)
    follows the reference backend, fp32."""
    data = batches(n=3, dtype=torch.float32)
    nets = [make_net(torch.float32), make_net(torch.float32)]
    opts = [SAM(n.parameters(), backend=b, **VARIANTS[variant], **SGD_CFG)
            for n, b in zip(nets, ("triton", "reference"))]
    assert opts[0]._backends[0].name == "triton"
    for net, opt in zip(nets, opts):
        run_ours(net, opt, data)
    for p, q in zip(*(n.parameters() for n in nets)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_explicit_backend_without_sam_kernels_raises(monkeypatch):
    from fused_flat import backends
    from fused_flat.backends import reference

    nosam = backends.lift("cpp", ("cpu",), reference.perturb_, reference.restore_and_step_)
    monkeypatch.setitem(backends._cache, "cpp", nosam)
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.raises(ValueError, match="'cpp' has no SAM kernels"):
        SAM(make_net().parameters(), backend="cpp")
    with pytest.warns(RuntimeWarning, match="no compiled SAM kernels"):
        opt = SAM(make_net().parameters(), backend="auto")   # falls through, says so once
    assert opt._backends[0].name == "reference"
