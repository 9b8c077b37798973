"""torch.compile of the optimizer step (issue 12 item 4, issue 20): one compilation for
every step counter and learning rate (lr as a CPU tensor, updated in place by the LR
scheduler; a float lr: no more compilations than torch.optim.SGD's), the state of the first
step (momentum buffers, backups) included, no host reads in the graph, results bitwise
equal to eager on CPU."""
import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.testing import CompileCounter

from fused_flat import FSGLD, SAM
from fused_flat.backends import _native

pytestmark = pytest.mark.skipif(not _native.available(), reason="needs the compiled CPU ops")
STEPS = 20


@pytest.fixture(autouse=True)
def _reset():
    dynamo.reset()
    yield
    dynamo.reset()


def _setup(kind, momentum):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    lr = torch.tensor(0.05)
    if kind == "fsgld":
        opt = FSGLD(m.parameters(), lr=lr, beta=1e4, momentum=momentum, seed=1, backend="cpp")
    else:
        opt = SAM(m.parameters(), lr=lr, momentum=momentum, rho=0.05, seed=1, backend="cpp")
    return m, opt, lambda: torch.nn.functional.mse_loss(m(x), y)


def _run(form, momentum, compiled, fullgraph=False):
    kind = "sam" if form.startswith("sam") else "fsgld"
    m, opt, loss_fn = _setup(kind, momentum)
    cc = CompileCounter()
    comp = (lambda f: torch.compile(f, backend=cc, fullgraph=fullgraph)) if compiled else (lambda f: f)
    # compiled before the scheduler wraps opt.step (torch's wrapper lives in a file dynamo skips)
    if form == "fsgld2":
        step = comp(opt.step)
    elif form == "fsgldc":
        step = comp(opt.step)
    else:
        first, second = comp(opt.first_step), comp(opt.second_step)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
    warm = None
    for i in range(STEPS):
        if i == 1:
            warm = cc.frame_count
        if form == "fsgld2":
            opt.perturb()
            opt.zero_grad()
            loss_fn().backward()
            step()
        elif form == "fsgldc":
            def closure():
                opt.zero_grad()
                loss = loss_fn()
                loss.backward()
                return loss
            step(closure)
        else:
            opt.zero_grad()
            loss_fn().backward()
            first()
            opt.zero_grad()
            loss_fn().backward()
            second()
        sched.step()
    assert opt.step_count == STEPS
    return [p.detach().clone() for p in m.parameters()], cc, warm


@pytest.mark.parametrize("form,fullgraph", [("fsgld2", True), ("sam2", True), ("fsgldc", False)])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_compiles_once_and_matches_eager(form, fullgraph, momentum):
    eager, _, _ = _run(form, momentum, compiled=False)
    got, cc, warm = _run(form, momentum, compiled=True, fullgraph=fullgraph)
    for a, b in zip(eager, got):
        assert torch.equal(a, b)
    # the first step creates state (momentum buffers, SAM's backups) before it is traced
    # (FlatOptimizer._init_group): one frame per compiled function, all in the first step;
    # none after, over 19 steps whose step counter and scheduler lr change (StepLR halves
    # the lr every 3 steps). The closure form: the perturbation, the closure's forward
    # (its zero_grad and backward split the graph) and the update.
    fns = {"fsgld2": 1, "sam2": 2, "fsgldc": 3}[form]
    assert warm <= fns
    assert cc.frame_count == warm


def test_no_recompile_per_step_reason():
    from torch._dynamo.utils import counters
    counters.clear()
    _run("fsgld2", 0.9, compiled=True, fullgraph=True)
    _run("sam2", 0.9, compiled=True, fullgraph=True)
    assert sum(counters["unimplemented"].values()) == 0


def _full_train_step_run(kind, compiled):
    m, opt, loss_fn = _setup(kind, momentum=0.9)
    cc = CompileCounter()

    def train_step():   # forward, backward and the optimizer step in one function
        if kind == "fsgld":
            opt.perturb()
            loss = loss_fn()
            loss.backward()
            opt.step()
        else:
            loss = loss_fn()
            loss.backward()
            opt.first_step(zero_grad=True)
            loss_fn().backward()
            opt.second_step()
        return loss.detach()

    f = torch.compile(train_step, backend=cc) if compiled else train_step
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
    frames = []
    for _ in range(STEPS):
        opt.zero_grad()
        f()
        sched.step()
        frames.append(cc.frame_count)
    return [p.detach().clone() for p in m.parameters()], frames


@pytest.mark.parametrize("kind", ["fsgld", "sam"])
def test_compiled_full_train_step_compiles_once_and_matches_eager(kind):
    """A whole train step (forward, backward, optimizer) under torch.compile: backward splits
    it into frames, which compile in the first two steps (state is created) and never again
    over the remaining 18 steps with StepLR moving the tensor lr; bitwise equal to eager."""
    eager, _ = _full_train_step_run(kind, compiled=False)
    got, frames = _full_train_step_run(kind, compiled=True)
    assert frames[1] > 0 and frames[-1] == frames[1]
    for a, b in zip(eager, got):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ against torch.optim.SGD
# (issue 20) torch.compile over 20 steps with StepLR, every optimizer and form, next to
# torch.optim.SGD with the same momentum compiled the same way (benchmarks/compile_frames.py
# drives both and prints the table).
FORMS = [("SGLD", "step"), ("FSGLD", "perturb+step"), ("RWP", "perturb+step"),
         ("SAM", "first+second"), ("FSGLD", "closure"), ("SAM", "closure")]


@pytest.mark.parametrize("name,form", FORMS)
@pytest.mark.parametrize("lr_kind", ["tensor", "float"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_frames_against_sgd_and_equal_to_eager(name, form, lr_kind, momentum):
    """Tensor lr: each compiled function compiles once over the 20 steps (2 frames at most
    in all: SAM's first_step and second_step), the steps that create the momentum buffers
    and backups included. Float lr: no more frames than torch.optim.SGD compiled the same
    way (its step, or step(closure) for the closure forms) per compiled function of ours;
    the closure forms compile one frame more than SGD's, the half before the closure
    (perturbation, first_step), which a float lr recompiles once when the scheduler first
    changes it, as every frame that reads the param groups. Bitwise equal to eager."""
    from benchmarks.compile_frames import run

    eager, _, opt_e = run(name, form, "cpp", momentum, lr_kind, compiled=False)
    got, frames, opt_c = run(name, form, "cpp", momentum, lr_kind, compiled=True)
    for a, b in zip(eager, got):
        assert torch.equal(a, b)
    # the checkpoint is the eager one: torch.optim.SGD's format, same buffers, same counters
    _assert_same(opt_c.state_dict(), opt_e.state_dict())
    closure = form == "closure"
    _, sgd, _ = run("SGD", "closure" if closure else "step", "-", momentum, lr_kind, compiled=True)
    fns = 2 if form == "first+second" else 1
    if closure:
        assert frames <= sgd + (2 if lr_kind == "float" else 1), (frames, sgd)
    elif lr_kind == "tensor":
        assert frames <= fns <= 2, frames
    else:
        assert frames <= fns * sgd, (frames, sgd)


def _assert_same(a, b, where="state_dict"):
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where
