"""Step plans (fused_flat.optim.core.StepPlan): the eager 'cpp' step run from per-bucket plans gives
the bits of the general path.

Each case trains twice from the same start: as built (the step runs its plans wherever it
can) and with plans switched off on the instance (``_plans_enabled = False``: every step
takes the general path, the definition). Parameters, momentum buffers, the step and skip
counts and the checkpoint entry must be equal bit for bit. The cases include the first step
(momentum created), gradients missing for some parameters, frozen parameters, several
buckets, n_perturbations=2, bf16 with stochastic rounding, fp32 masters, GradScaler, skipped
steps, channels_last parameters and gradients laid out otherwise, and changes between steps
(dtype, memory format, requires_grad, a loaded state dict) after which plans must not be
used as they were.

The op-level tests check the list ops' ``layout`` form: the user's tensors of any dense
shape give the values of their flat views, and a list that no longer matches its record,
or a gradient that does not match its parameter, is refused before anything is written.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from fused_flat import FSGLD, RWP, SAM, SGLD, backends
from fused_flat.optim.msam import MSAM
from tests import cpp_per_tensor as cpt

pytestmark = pytest.mark.skipif(
    backends.available_backends().get("cpp") != "ok" or backends.get("cpp").check_step is None,
    reason="the compiled extension (with the step-plan ops) is not built")

STEPS = 6


# ----------------------------------------------------------------------------- models
class Net(nn.Module):
    """A conv layer (so channels_last means something), a linear head and a spare linear
    layer that gets a gradient only when ``use_spare``."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, dtype=dtype)
        self.head = nn.Linear(4 * 3 * 3, 5, dtype=dtype)
        self.spare = nn.Linear(5, 5, dtype=dtype)
        self.use_spare = True

    def forward(self, x):
        h = torch.tanh(self.conv(x.to(self.conv.weight.dtype)))
        h = self.head(h.flatten(1))
        return self.spare(h.to(self.spare.weight.dtype)) if self.use_spare else h


def _data(k: int):
    g = torch.Generator().manual_seed(100 + k)
    return torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 5, generator=g)


def _loss(model, k):
    x, y = _data(k)
    return (model(x).float() - y).square().mean()


# ----------------------------------------------------------------------------- running
def _grads_hook(case, model, k, opt):
    """What a case does to the gradients of step k before the update."""
    hook = case.get("grads")
    if hook is not None:
        hook(model, k, opt)


def _step(case, opt, model, k, scaler=None):
    form = case["form"]
    if form == "sgd":                      # SGLD and friends: one gradient, step()
        opt.zero_grad()
        loss = _loss(model, k)
        (scaler.scale(loss) if scaler else loss).backward()
        _grads_hook(case, model, k, opt)
        scaler.step(opt) if scaler else opt.step()
    elif form == "two-call":               # Langevin: perturb(), backward, step()
        opt.zero_grad()
        opt.perturb()
        loss = _loss(model, k)
        (scaler.scale(loss) if scaler else loss).backward()
        _grads_hook(case, model, k, opt)
        scaler.step(opt) if scaler else opt.step()
    elif form == "closure":                # Langevin step(closure) (n_perturbations)
        def closure():
            opt.zero_grad()
            loss = _loss(model, k)
            loss.backward()
            _grads_hook(case, model, k, opt)
            return loss
        opt.step(closure)
    elif form == "sam":                    # first_step / second_step
        opt.zero_grad()
        loss = _loss(model, k)
        (scaler.scale(loss) if scaler else loss).backward()
        case.get("g1", lambda *a: None)(model, k, opt)
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        loss = _loss(model, k)
        (scaler.scale(loss) if scaler else loss).backward()
        _grads_hook(case, model, k, opt)
        scaler.step(opt) if scaler else opt.second_step(zero_grad=True)
    elif form == "sam-closure":
        def closure():
            loss = _loss(model, k)
            loss.backward()
            return loss
        opt.zero_grad()
        _loss(model, k).backward()
        opt.step(closure)
    elif form == "msam":
        x, y = _data(k)
        opt.step(lambda mb: (model(mb[0]).float() - mb[1]).square().mean().backward() or
                 (model(mb[0]).float() - mb[1]).square().mean(), (x, y))
    if scaler:
        scaler.update()


def _run(case, plans: bool):
    torch.manual_seed(0)
    model = Net(case.get("dtype", torch.float32))
    if case.get("channels_last"):
        model.conv.to(memory_format=torch.channels_last)
    for name in case.get("frozen", ()):
        getattr(model, name).requires_grad_(False)
    opt = case["make"](model)
    if not plans:
        opt._plans_enabled = False
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8) if case.get("scaler") else None
    planned = 0
    for k in range(case.get("steps", STEPS)):
        if k in case.get("events", {}):
            case["events"][k](model, opt)
        _step(case, opt, model, k, scaler)
        planned += _ran_planned(opt)
    return model, opt, planned


def _ran_planned(opt) -> bool:
    """Whether the last step ran from plans (this test's premise, not a property of the
    optimizer: a step that takes the general path drops them)."""
    plans = opt._plans
    return bool(plans is not None and plans.ok and all(P.grads is not None for P in plans))


def _assert_same(a, b):
    (ma, oa, _), (mb, ob, _) = a, b
    for (name, p), q in zip(ma.named_parameters(), mb.parameters()):
        assert p.dtype == q.dtype and p.stride() == q.stride(), name
        assert torch.equal(p, q), name
        sa, sb = oa.state.get(p, {}), ob.state.get(q, {})
        assert sa.keys() == sb.keys(), name
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert torch.equal(sa[key], sb[key]), (name, key)
    assert oa.step_count == ob.step_count and oa.skipped_steps == ob.skipped_steps
    assert oa.state_dict()["fused_flat"] == ob.state_dict()["fused_flat"]


# ----------------------------------------------------------------------------- cases
def _none_grad(names, steps):
    def hook(model, k, opt):
        if k in steps:
            for n in names:
                for p in getattr(model, n).parameters():
                    p.grad = None
    return hook


def _nan_grad(steps, value=math.nan):
    def hook(model, k, opt):
        if k in steps:
            model.head.weight.grad[0, 1] = value
    return hook


def _other_layout_grad(model, k, opt):
    """A gradient laid out unlike its parameter (contiguous for a channels_last weight,
    transposed-then-contiguous for a linear one): read in the parameter's memory order."""
    w = model.conv.weight
    if w.grad is not None:
        w.grad = w.grad.contiguous() if not w.is_contiguous() else \
            w.grad.contiguous(memory_format=torch.channels_last)
    h = model.head.weight
    if h.grad is not None:
        h.grad = h.grad.t().contiguous().t()


def _two_groups(cls, **kw):
    def make(model):
        return cls([{"params": [model.conv.weight, model.head.weight]},
                    {"params": [model.conv.bias, model.head.bias, *model.spare.parameters()],
                     "weight_decay": 0.0, "lr": 0.02}], **kw)
    return make


def _mixed_dtype(model):
    model.spare.to(torch.bfloat16)


FS = dict(lr=0.05, beta=1e4, momentum=0.9, weight_decay=1e-3, seed=3, backend="cpp")
SA = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, rho=0.05, seed=3, backend="cpp")

CASES = {
    "fsgld": dict(form="two-call", make=lambda m: FSGLD(m.parameters(), **FS)),
    "fsgld-closure-n2": dict(form="closure",
                             make=lambda m: FSGLD(m.parameters(), n_perturbations=2, **FS)),
    "sgld-nesterov-maximize": dict(form="sgd", make=lambda m: SGLD(
        m.parameters(), lr=0.05, beta=1e5, momentum=0.9, nesterov=True, maximize=True, seed=3,
        backend="cpp")),
    "sgld-no-momentum-unchecked": dict(form="sgd", make=lambda m: SGLD(
        m.parameters(), lr=0.05, beta=1e5, seed=3, backend="cpp", check_finite=False)),
    "rwp-dampening": dict(form="two-call", make=lambda m: RWP(
        m.parameters(), lr=0.05, sigma=0.01, momentum=0.5, dampening=0.3, seed=3, backend="cpp")),
    "fsgld-exact-restore": dict(form="two-call",
                                make=lambda m: FSGLD(m.parameters(), exact_restore=True, **FS)),
    "fsgld-nan-skips": dict(form="two-call", make=lambda m: FSGLD(m.parameters(), **FS),
                            grads=_nan_grad({0, 3})),
    "fsgld-some-grads-none": dict(form="two-call", make=lambda m: FSGLD(m.parameters(), **FS),
                                  grads=_none_grad(["spare"], {2, 3})),
    "fsgld-frozen-then-unfrozen": dict(
        form="two-call", make=lambda m: FSGLD(m.parameters(), **FS), frozen=["spare"],
        events={3: lambda m, o: m.spare.requires_grad_(True)}),
    "fsgld-spare-unused": dict(
        form="two-call", make=lambda m: FSGLD(m.parameters(), **FS),
        events={2: lambda m, o: setattr(m, "use_spare", False)}),
    "fsgld-two-groups-mixed-dtype": dict(
        form="two-call", make=lambda m: (_mixed_dtype(m), _two_groups(FSGLD, **FS)(m))[1]),
    "fsgld-bf16-sr": dict(form="two-call", dtype=torch.bfloat16,
                          make=lambda m: FSGLD(m.parameters(), **FS)),
    "fsgld-bf16-masters": dict(form="two-call", dtype=torch.bfloat16,
                               make=lambda m: FSGLD(m.parameters(), master_weights=True, **FS)),
    "fsgld-channels-last-other-grad-layout": dict(
        form="two-call", channels_last=True, make=lambda m: FSGLD(m.parameters(), **FS),
        grads=_other_layout_grad),
    "fsgld-grad-scaler": dict(form="two-call", scaler=True,
                              make=lambda m: FSGLD(m.parameters(), **FS),
                              grads=_nan_grad({2}, math.inf)),
    "sgld-tensor-lr": dict(form="sgd", make=lambda m: SGLD(
        m.parameters(), lr=torch.tensor(0.05), beta=1e5, momentum=0.9, seed=3, backend="cpp"),
        events={k: (lambda m, o: o.param_groups[0]["lr"].mul_(0.5)) for k in (2, 4)}),
    "fsgld-changes-between-steps": dict(form="two-call", make=lambda m: FSGLD(m.parameters(), **FS),
                                        events={2: lambda m, o: m.double(),
                                                3: lambda m, o: m.conv.to(memory_format=torch.channels_last),
                                                4: lambda m, o: o.load_state_dict(o.state_dict()),
                                                5: lambda m, o: m.head.bias.requires_grad_(False)},
                                        steps=8),
    "fsgld-param-group-added": dict(
        form="two-call", frozen=["spare"],
        make=lambda m: FSGLD([m.conv.weight, m.conv.bias, m.head.weight, m.head.bias], **FS),
        events={3: lambda m, o: (m.spare.requires_grad_(True),
                                 o.add_param_group({"params": list(m.spare.parameters())}))}),
    "sam": dict(form="sam", make=lambda m: SAM(m.parameters(), **SA)),
    "asam-closure": dict(form="sam-closure", make=lambda m: SAM(m.parameters(), adaptive=True,
                                                                  adaptive_eta=0.01, **SA)),
    "usam-nesterov": dict(form="sam", make=lambda m: SAM(
        m.parameters(), normalize=False, nesterov=True, lr=0.1, momentum=0.9, rho=0.05, seed=3,
        backend="cpp")),
    "sam-two-groups-mixed-dtype": dict(
        form="sam", make=lambda m: (_mixed_dtype(m), _two_groups(SAM, **SA)(m))[1]),
    "sam-bf16-sr": dict(form="sam", dtype=torch.bfloat16, make=lambda m: SAM(m.parameters(), **SA)),
    "sam-bf16-masters": dict(form="sam", dtype=torch.bfloat16,
                             make=lambda m: SAM(m.parameters(), master_weights=True, **SA)),
    "sam-g2-missing": dict(form="sam", make=lambda m: SAM(m.parameters(), **SA),
                           grads=_none_grad(["spare"], {2})),
    "sam-nan-g1-g2": dict(form="sam", make=lambda m: SAM(m.parameters(), **SA),
                          grads=_nan_grad({2}), g1=_nan_grad({4})),
    "sam-grad-scaler": dict(form="sam", scaler=True, make=lambda m: SAM(m.parameters(), **SA),
                            grads=_nan_grad({2}, math.inf)),
    "sam-channels-last-other-grad-layout": dict(
        form="sam", channels_last=True, make=lambda m: SAM(m.parameters(), **SA),
        grads=_other_layout_grad),
    "sam-gradless-group-no-momentum": dict(
        form="sam", frozen=["spare"],
        make=lambda m: SAM([{"params": [*m.conv.parameters(), *m.head.parameters()]},
                            {"params": list(m.spare.parameters())}], lr=0.1, rho=0.05, seed=3,
                           backend="cpp")),
    "fsgld-gradless-group": dict(
        form="two-call", frozen=["spare"],
        make=lambda m: FSGLD([{"params": [*m.conv.parameters(), *m.head.parameters()]},
                              {"params": list(m.spare.parameters()), "sigma": 0.02}], **FS)),
    "msam": dict(form="msam", make=lambda m: MSAM(m.parameters(), micro_batch_size=2, **SA)),
}
# where every step after the first few must run from plans (the premise of the comparison)
GENERAL_ONLY = {"fsgld-bf16-masters", "sam-bf16-masters", "msam"}


@pytest.mark.filterwarnings("ignore:.*non-finite")
@pytest.mark.parametrize("name", list(CASES))
def test_planned_steps_give_the_general_paths_bits(name):
    case = CASES[name]
    planned = _run(case, plans=True)
    general = _run(case, plans=False)
    _assert_same(planned, general)
    assert general[2] == 0
    if name in GENERAL_ONLY:
        assert planned[2] == 0
    else:   # else the comparison would prove nothing
        assert planned[2] >= 2, f"{name}: only {planned[2]} steps ran from plans"


def test_a_refused_gradient_leaves_the_weights_as_the_general_path_does():
    """A gradient the optimizer refuses (wrong shape) after a planned perturbation: the same
    ValueError as without plans, weights restored, nothing updated."""
    outs = []
    for plans in (True, False):
        torch.manual_seed(0)
        model = Net()
        opt = FSGLD(model.parameters(), exact_restore=True, **FS)
        opt._plans_enabled = plans
        for k in range(2):
            _step(CASES["fsgld"], opt, model, k)
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        opt.perturb()
        _loss(model, 2).backward()
        model.head.weight.grad.data = torch.zeros(3)   # past the .grad setter's check
        with pytest.raises(ValueError, match="does not match its parameter") as info:
            opt.step()
        outs.append(str(info.value))
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        assert opt.step_count == 2
    assert outs[0] == outs[1]


# ----------------------------------------------------------------------------- the ops
ops = pytest.importorskip("fused_flat.backends.cpp")
sam_ops = pytest.importorskip("fused_flat.backends.cpp_sam")


def _user_tensors(dtype=torch.float32, seed=0):
    """Parameters of several shapes and memory formats (one channels_last, one 0-element)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3, 3, 3), (7,), (5, 6), (0,), (2, 3, 1, 4)]
    ps = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    ps[0] = ps[0].contiguous(memory_format=torch.channels_last)
    ps[4] = ps[4].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)   # dense, not contiguous
    offs, n = [], 3
    for p in ps:
        offs.append(n)
        n += (p.numel() + 3) & ~3
    return ps, offs


def _flat(t):
    return t.view(-1) if t.is_contiguous() else t.as_strided((t.numel(),), (1,))


def _like(ps, seed, fmt_of=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for p in ps:
        t = torch.empty_like(p)
        t.copy_(torch.randn(p.shape, generator=g).to(p.dtype))
        out.append(t)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layout_form_of_the_langevin_list_ops_gives_the_flat_views_values(dtype):
    ps, offs = _user_tensors(dtype)
    gs, ms = _like(ps, 1), _like(ps, 2)
    gs[2] = gs[2].t().contiguous().t()      # a gradient laid out unlike its parameter
    a = [p.clone(memory_format=torch.preserve_format) for p in ps]
    b = [p.clone(memory_format=torch.preserve_format) for p in ps]
    ma = [m.clone(memory_format=torch.preserve_format) for m in ms]
    mb = [m.clone(memory_format=torch.preserve_format) for m in ms]
    layout = ops.plan_layout(a)
    ops.perturb_list_(a, offs, 5, 1, 7, 0, 0.03, layout)
    ops.perturb_list_([_flat(t) for t in b], offs, 5, 1, 7, 0, 0.03)
    args = (None, None, 5, 1, 7, 0, 0.03, 0.1, 1e-3, 0.9, 0.1, False, False, 1e-3, 1.0, True)
    ops.restore_and_step_list_(a, gs, ma, offs, *args, layout=layout)
    ops.restore_and_step_list_([_flat(t) for t in b],
                               [_flat(torch.empty_like(p).copy_(g)) for p, g in zip(b, gs)],
                               [_flat(t) for t in mb], offs, *args)
    for x, y in zip(a + ma, b + mb):
        assert torch.equal(x, y)
    if dtype == torch.float32:
        fa = ops.restore_check_list_(a, gs, offs, 5, 1, 8, 0, -0.03, layout)
        fb = ops.restore_check_list_([_flat(t) for t in b],
                                     [_flat(torch.empty_like(p).copy_(g)) for p, g in zip(b, gs)],
                                     offs, 5, 1, 8, 0, -0.03)
        assert torch.equal(fa, fb) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layout_form_of_the_sam_list_ops_gives_the_per_tensor_ops_values(dtype, adaptive):
    ps, offs = _user_tensors(dtype, seed=3)
    gs, ms = _like(ps, 4), _like(ps, 5)
    gs[0] = gs[0].contiguous()              # channels_last parameter, contiguous gradient
    a = [p.clone(memory_format=torch.preserve_format) for p in ps]
    b = [_flat(p.clone(memory_format=torch.preserve_format)) for p in ps]
    bka, bkb = [torch.empty_like(p) for p in a], [torch.empty_like(p) for p in b]
    ma = [m.clone(memory_format=torch.preserve_format) for m in ms]
    mb = [_flat(m.clone(memory_format=torch.preserve_format)) for m in ms]
    gb = [_flat(torch.empty_like(p).copy_(g)) for p, g in zip(ps, gs)]
    layout = ops.plan_layout(a)
    sq = sam_ops.sam_grad_sq_norm_list(gs, a, adaptive, 0.01, layout)
    for t in range(len(ps)):
        want = cpt.sam_grad_sq_norm(gb[t], b[t] if adaptive else None, 0.01)
        assert torch.equal(sq[t], want)
    sam_ops.sam_perturb_list_(a, gs, bka, adaptive, 0.2, 0.01, layout)
    for p, g, bk in zip(b, gb, bkb):
        cpt.sam_perturb_(p, g, bk, adaptive, 0.2, 0.01)
    sr = dtype == torch.bfloat16
    sam_ops.sam_restore_and_step_list_(a, bka, gs, ma, None, None, 0.1, 1e-3, 0.9, 0.1, False,
                                       False, 1.0, sr, 5, 1, 7, offs, layout)
    for t in range(len(ps)):
        cpt.sam_restore_and_step_(b[t], bkb[t], gb[t], mb[t], None, None, 0.1, 1e-3, 0.9, 0.1,
                                      False, False, 1.0, *((True, 5, 1, 7, offs[t]) if sr else ()))
    for x, y in zip(a + ma, b + mb):
        assert torch.equal(_flat(x), y)


def test_a_list_that_no_longer_matches_its_record_is_refused_before_anything_is_written():
    ps, offs = _user_tensors()
    ps = [nn.Parameter(p) for p in ps]
    layout = ops.plan_layout(ps)
    changes = {
        "changed dtype": lambda: setattr(ps[1], "data", ps[1].data.double()),
        "changed shape": lambda: setattr(ps[2], "data", torch.zeros(6, 5)),
        "changed memory layout": lambda: setattr(ps[0], "data", ps[0].data.contiguous()),
        "changed requires_grad": lambda: ps[1].requires_grad_(False),
    }
    for what, change in changes.items():
        saved = [(p.data, p.requires_grad) for p in ps]
        change()
        before = [p.detach().clone() for p in ps]
        with pytest.raises(ValueError, match=f"stale step plan: tensor \\d {what}"):
            with torch.no_grad():
                ops.perturb_list_(ps, offs, 5, 1, 7, 0, 0.03, layout)
        with pytest.raises(ValueError, match="stale step plan"):
            ops.check_step_list(ps, layout, [], None, False)
        assert all(torch.equal(p, q) for p, q in zip(ps, before))
        for p, (d, rg) in zip(ps, saved):
            p.data = d
            p.requires_grad_(rg)
    with pytest.raises(ValueError, match="stale step plan: 4 tensors given, 5 recorded"):
        ops.check_step_list(ps[:4], layout, [], None, False)


@pytest.mark.filterwarnings("ignore:Sparse (CSR|CSC|BSR) tensor support is in beta")
def test_check_step_list_checks_the_gradients_as_the_optimizers_do():
    ps = [torch.zeros(3, 4), torch.zeros(5)]
    layout = ops.plan_layout(ps)
    g = torch.ones(3, 4)
    mask = torch.tensor([True, False])
    assert float(ops.check_step_list(ps, layout, [g, None], mask, True)) == 0.0
    g[1, 2] = math.inf
    assert float(ops.check_step_list(ps, layout, [g, None], mask, True)) == 1.0
    assert float(ops.check_step_list(ps, layout, [g, None], mask, False)) == 0.0
    for bad in (g.to_sparse(), g.to_sparse_csr()):
        with pytest.raises(ValueError, match=r"layout torch\.sparse_\w+ \(of a parameter of shape "
                                             r"\(3, 4\)\): sparse gradients are not supported"):
            ops.check_step_list(ps, layout, [bad, None], None, True)
    with pytest.raises(ValueError, match=r"a gradient of \(4, 3\) torch.float32 on cpu does not "
                                         r"match its parameter \(\(3, 4\) torch.float32 on cpu\)"):
        ops.check_step_list(ps, layout, [torch.ones(4, 3), None], None, True)
    with pytest.raises(ValueError, match="torch.float64 on cpu does not match"):
        ops.check_step_list(ps, layout, [torch.ones(3, 4, dtype=torch.float64), None], None, True)
    with pytest.raises(ValueError, match="parameter 1 has a gradient now"):
        ops.check_step_list(ps, layout, [torch.ones(3, 4), torch.ones(5)], mask, True)
    with pytest.raises(ValueError, match="parameter 0 has no gradient now"):
        ops.check_step_list(ps, layout, [None, None], mask, True)


def test_layout_form_refuses_state_laid_out_unlike_its_parameter():
    ps, offs = _user_tensors()
    layout = ops.plan_layout(ps)
    moms = [torch.zeros_like(p) for p in ps]
    moms[0] = moms[0].contiguous()          # the parameter is channels_last
    before = [p.clone() for p in ps]
    with pytest.raises(ValueError, match="momentum_buffer must match its parameter"):
        ops.restore_and_step_list_(ps, _like(ps, 1), moms, offs, None, None, 5, 1, 7, 0, 0.0, 0.1,
                                   0.0, 0.9, 0.0, False, False, 0.0, 1.0, False, layout)
    assert all(torch.equal(p, q) for p, q in zip(ps, before))


def test_plan_ops_pass_opcheck():
    """Schemas (what each op writes), fake implementations and dispatch of the step-plan
    ops and of the list ops' layout form (plain tensors: no autograd involved)."""
    ff = torch.ops.fused_flat
    ps, offs = _user_tensors()
    gs, ms = _like(ps, 1), _like(ps, 2)
    layout = ops.plan_layout(ps)
    torch.library.opcheck(ff.plan_layout, (ps,))
    torch.library.opcheck(ff.check_step_list, (ps, layout, list(gs), torch.ones(len(ps), dtype=torch.bool),
                                               True))
    torch.library.opcheck(ff.perturb_list_, ([p.clone() for p in ps], offs, 5, 1, 7, 0, 0.03, layout))
    torch.library.opcheck(ff.restore_check_list_, ([p.clone() for p in ps], gs, offs, 5, 1, 7, 0, -0.03,
                                                   layout))
    torch.library.opcheck(ff.restore_and_step_list_, (
        [p.clone() for p in ps], gs, [m.clone() for m in ms], offs, None, None, 5, 1, 7, 0, 0.03, 0.1,
        0.0, 0.9, 0.0, False, False, 1e-3, 1.0, False, layout))
    torch.library.opcheck(ff.sam_grad_sq_norm_list, (gs, ps, True, 0.01, layout))
    torch.library.opcheck(ff.sam_perturb_list_, ([p.clone() for p in ps], gs,
                                                 [torch.empty_like(p) for p in ps], False, 0.1, 0.0, layout))
    torch.library.opcheck(ff.sam_restore_and_step_list_, (
        [p.clone() for p in ps], [p.clone() for p in ps], gs, [m.clone() for m in ms], None, None, 0.1,
        0.0, 0.9, 0.0, False, False, 1.0, False, 0, 0, 0, offs, layout))


# ----------------------------------------------------------------------------- the user's state
RESETS = {
    "state.clear()": lambda o: o.state.clear(),
    "momentum_buffer = None": lambda o: [st.__setitem__("momentum_buffer", None)
                                         for st in o.state.values()],
    "a new state dict": lambda o: setattr(o, "state", __import__("collections").defaultdict(dict)),
}


@pytest.mark.parametrize("reset", list(RESETS))
@pytest.mark.parametrize("make", ["SGLD", "SAM"])
def test_momentum_reset_by_the_user_is_seen_as_torch_optim_sees_it(make, reset):
    """Idioms that reset the momentum between steps (torch.optim.SGD then starts it anew
    from d): a plan must not keep using the buffers it holds."""
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(8)) for _ in range(3)]
    ref = [nn.Parameter(p.detach().clone()) for p in ps]
    kw = dict(lr=0.1, momentum=0.9, dampening=0.5)
    opt = (SGLD(ps, beta=math.inf, backend="cpp", **kw) if make == "SGLD"
           else SAM(ps, rho=0.0, backend="cpp", **kw))
    sgd = torch.optim.SGD(ref, **kw)
    for k in range(6):
        grads = [torch.randn(8) for _ in ps]
        for p, q, g in zip(ps, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        if make == "SGLD":
            opt.step()
        else:
            opt.first_step()
            for p, g in zip(ps, grads):   # rho = 0: g2 at the same point
                p.grad = g.clone()
            opt.second_step()
        sgd.step()
        if k == 2:
            RESETS[reset](opt)
            RESETS[reset](sgd)
    for p, q in zip(ps, ref):   # theta - lr d vs torch's FMA: a few roundings over 6 steps
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
