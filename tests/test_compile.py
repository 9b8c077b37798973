"""torch.compile of the optimizer step (issue 12 item 4, issue 20): one compilation for
every step counter and learning rate (lr as a CPU tensor, updated in place by the LR
scheduler; a float lr: no more compilations than torch.optim.SGD's), the state of the first
step (momentum buffers, backups) included, no host reads in the graph, results bitwise
equal to eager on CPU; with the 'cpp' backend and with the pure-torch 'reference' (which
takes the step, lr and noise scale as tensors in its computation)."""
import pytest
import torch
import torch._dynamo as dynamo
from torch._dynamo.testing import CompileCounter

from fused_flat.backends import _native

needs_cpp = pytest.mark.skipif(not _native.available(), reason="needs the compiled CPU ops")
BACKENDS = [pytest.param("cpp", marks=needs_cpp), "reference"]
STEPS = 20


@pytest.fixture(autouse=True)
def _reset():
    dynamo.reset()
    yield
    dynamo.reset()


# the old test names of three forms: (optimizer, form) of benchmarks/compile_frames.run
_FORMS = {"fsgld2": ("FSGLD", "perturb+step"), "sam2": ("SAM", "first+second"),
          "fsgldc": ("FSGLD", "closure")}


def _run(form, momentum, compiled, fullgraph=False, backend="cpp"):
    """20 steps with StepLR and a tensor lr (benchmarks/compile_frames.run drives them):
    the parameters, the frames compiled in all and by the end of the first step."""
    from benchmarks.compile_frames import run

    got = run(*_FORMS[form], backend, momentum, "tensor", compiled, fullgraph=fullgraph)
    assert got.opt.step_count == STEPS
    return got.params, got.frames, got.first_frames


@pytest.mark.parametrize("form,fullgraph", [("fsgld2", True), ("sam2", True), ("fsgldc", False)])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_once_and_matches_eager(form, fullgraph, momentum, backend):
    eager, _, _ = _run(form, momentum, compiled=False, backend=backend)
    got, frames, warm = _run(form, momentum, compiled=True, fullgraph=fullgraph, backend=backend)
    for a, b in zip(eager, got):
        assert torch.equal(a, b)
    # the first step creates state (momentum buffers, SAM's backups) before it is traced
    # (FlatOptimizer._init_group): one frame per compiled function, all in the first step;
    # none after, over 19 steps whose step counter and scheduler lr change (StepLR halves
    # the lr every 3 steps). The closure form: the perturbation, the closure's forward
    # (its zero_grad and backward split the graph) and the update.
    fns = {"fsgld2": 1, "sam2": 2, "fsgldc": 3}[form]
    assert warm <= fns
    assert frames == warm


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_recompile_per_step_reason(backend):
    """No graph break (a host read such as ``.item()`` of the step or lr would be one)."""
    from torch._dynamo.utils import counters
    counters.clear()
    _run("fsgld2", 0.9, compiled=True, fullgraph=True, backend=backend)
    _run("sam2", 0.9, compiled=True, fullgraph=True, backend=backend)
    assert sum(counters["unimplemented"].values()) == 0


def _full_train_step_run(kind, compiled):
    from benchmarks.compile_frames import _model, make

    m, loss_fn = _model()
    opt = make("FSGLD" if kind == "fsgld" else "SAM", m.parameters(), torch.tensor(0.05), 0.9, "cpp")
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


@needs_cpp
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
@pytest.mark.parametrize("backend", BACKENDS)
def test_frames_against_sgd_and_equal_to_eager(name, form, lr_kind, momentum, backend):
    """Tensor lr: each compiled function compiles once over the 20 steps (2 frames at most
    in all: SAM's first_step and second_step), the steps that create the momentum buffers
    and backups included. Float lr: each compiled function of ours compiles no more frames
    than torch.optim.SGD's compiled the same way (its step, or step(closure) for the closure
    forms): SAM's first_step reads no lr and compiles once, its second_step and the other
    steps recompile once when the scheduler first changes the lr, as SGD's step; a closure
    form compiles at most one frame more than SGD's (the half before the closure: the
    perturbation, first_step, which reads no lr). Bitwise equal to eager, the checkpoint
    included. The same table for both backends."""
    from benchmarks.compile_frames import run

    eager = run(name, form, backend, momentum, lr_kind, compiled=False)
    got = run(name, form, backend, momentum, lr_kind, compiled=True)
    for a, b in zip(eager.params, got.params):
        assert torch.equal(a, b)
    # the checkpoint is the eager one: torch.optim.SGD's format, same buffers, same counters
    _assert_same(got.opt.state_dict(), eager.opt.state_dict())
    closure = form == "closure"
    sgd = run("SGD", "closure" if closure else "step", "-", momentum, lr_kind, compiled=True).frames
    frames, per_fn = got.frames, got.per_fn
    if closure:
        assert frames <= sgd + 1, (frames, sgd)
    elif lr_kind == "tensor":
        assert all(n == 1 for n in per_fn.values()) and frames <= 2, per_fn
    else:
        assert all(n <= sgd for n in per_fn.values()), (per_fn, sgd)
        if form == "first+second":
            assert per_fn["first_step"] == 1, per_fn   # reads no lr: no recompile for it


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


# ------------------------------------------------------------------ the reference takes tensors
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("found", [None, 0.0, 1.0])
def test_reference_tensor_values_give_the_bits_of_numbers(dtype, found):
    """The reference ops with step / lr / noise_std / SAM's coef as tensors (what a compiled
    step hands them: no host read, no guard) write the bits they write with numbers, also
    with a GradScaler's grad_scale and found_inf (a set one: the restore only, the
    momentum untouched), with stochastic rounding, and for a -0.0 weight with noise_std 0."""
    from fused_flat.backends import reference as R
    from fused_flat.backends import sam_reference as S

    torch.manual_seed(0)
    p0 = torch.randn(1003, dtype=dtype)
    p0[5] = -0.0
    g = torch.randn_like(p0)
    if found:
        g[7] = float("inf")
    m0 = torch.randn(1003, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    fi = None if found is None else torch.tensor([found])
    gs = torch.tensor([3.0])   # not a power of 2: a reciprocal and a product would round twice

    def bits(t):
        return t.view(torch.int64 if t.dtype == torch.float64 else torch.int16
                      if t.element_size() == 2 else torch.int32)

    def go(tensors):
        def as_t(v, dt=torch.float64):
            return torch.tensor(v, dtype=dt) if tensors else v

        step = as_t(2 ** 33 + 9, torch.int64)
        out = []
        for ns in (0.0, 0.013):
            p, m = p0.clone(), m0.clone()
            R.restore_and_step_(p, g, m, gs, fi, 7, 3, step, 17, 2, 0.01, as_t(0.037), 1e-3, 0.9,
                                0.1, False, False, as_t(ns), 0.5, True)
            out += [p, m]
        p, m, bk = p0.clone(), m0.clone(), torch.empty_like(p0)
        S.sam_perturb_(p, g, bk, True, as_t(0.05), 0.01)
        S.sam_restore_and_step_(p, bk, g, m, gs, fi, as_t(0.037), 1e-3, 0.9, 0.1, True, False,
                                0.5, True, 7, 3, step, 17)
        S.sam_probe_(p, bk, 7, 3, step, 1e-3, 9)
        return out + [p, m, bk]

    for a, b in zip(go(False), go(True)):
        assert torch.equal(bits(a), bits(b))


def test_reference_tensor_values_on_cuda_make_no_host_read():
    """On (fake) CUDA tensors the reference takes a CPU step / lr tensor (copied to the
    device, non_blocking) and device found_inf / grad_scale / coef without reading any of
    them on the host: the fake mode raises on a host read."""
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        FakeTensorMode,
    )

    from fused_flat.backends import reference as R
    from fused_flat.backends import sam_reference as S

    with FakeTensorMode():
        step, lr = torch.tensor(5), torch.tensor(0.1, dtype=torch.float64)
        p = torch.randn(100, device="cuda", dtype=torch.bfloat16)
        g, m, bk = torch.randn_like(p), torch.zeros(100, device="cuda"), torch.empty_like(p)
        fi, gs = torch.zeros(1, device="cuda"), torch.ones(1, device="cuda")
        R.restore_and_step_(p, g, m, gs, fi, 1, 0, step, 0, 0, 0.01, lr, 0.0, 0.9, 0.0, False,
                            False, (2 * lr / 1e4).sqrt(), 1.0, True)
        R.perturb_(p, 1, 0, torch.tensor(3, device="cuda"), 3, 0.01, 8)
        S.sam_perturb_(p, g, bk, True, torch.tensor(0.5, device="cuda", dtype=torch.float64), 0.01)
        S.sam_restore_and_step_(p, bk, g, m, gs, fi, lr, 0.0, 0.9, 0.0, False, False, 1.0, True,
                                1, 0, step, 0)
        S.sam_probe_(p, bk, 1, 0, step, 1e-3, 4)
        with pytest.raises(DataDependentOutputException):   # the mode does catch host reads
            bool(p.float().sum() > 0)
