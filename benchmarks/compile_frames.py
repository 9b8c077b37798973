"""How many frames torch.compile compiles for a compiled optimizer step over 20 steps with
an LR scheduler (issue 20): fused_flat's optimizers next to torch.optim.SGD (default,
foreach, fused), CPU, tensor lr and float lr, momentum 0 and 0.9; and whether the compiled
run is bitwise equal to the eager one.

    .venv/bin/python -m benchmarks.compile_frames [--backend cpp,reference] [--why]

One row per (optimizer, form, backend, momentum, lr kind): ``frames`` is
CompileCounter.frame_count over all 20 steps (the first ones, which create state such as
momentum buffers, included; for SAM's first+second form also per compiled function,
``total (first_step+second_step)``), ``eq`` whether the parameters equal those of the eager
run bit for bit (``max|d|`` otherwise; ``err`` names an exception). ``--why`` prints
dynamo's recompile reasons (TORCH_LOGS=recompiles) as they happen.
"""
from __future__ import annotations

import argparse
import warnings
from typing import NamedTuple

import torch
import torch._dynamo as dynamo
from torch._dynamo.testing import CompileCounter

STEPS = 20

# (optimizer, form): how each is driven. "step": compiled step() (SGLD / torch's SGD);
# "perturb+step": eager perturb(), compiled step(); "closure": compiled step(closure) (the
# closure zeroes the gradients, runs the forward and backward); "first+second": compiled
# first_step() and second_step() (two compiled functions).
FORMS = (("SGD", "step"), ("SGD", "closure"), ("SGLD", "step"), ("FSGLD", "perturb+step"), ("FSGLD", "closure"),
         ("RWP", "perturb+step"), ("SAM", "first+second"), ("SAM", "closure"))
SGD_KINDS = ("default", "foreach", "fused", "for-loop")


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    return m, (lambda: torch.nn.functional.mse_loss(m(x), y))


def make(name: str, params, lr, momentum: float, backend: str, sgd_kind: str = "default"):
    import fused_flat

    if name == "SGD":
        kw = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True},
              "for-loop": {"foreach": False}}[sgd_kind]
        return torch.optim.SGD(params, lr=lr, momentum=momentum, **kw)
    kw = dict(lr=lr, momentum=momentum, seed=1, backend=backend)
    if name == "SGLD":
        return fused_flat.SGLD(params, beta=1e4, **kw)
    if name == "FSGLD":
        return fused_flat.FSGLD(params, beta=1e4, **kw)
    if name == "RWP":
        return fused_flat.RWP(params, sigma=0.01, **kw)
    if name == "SAM":
        return fused_flat.SAM(params, rho=0.05, **kw)
    raise ValueError(name)


class Run(NamedTuple):
    params: list          # the parameters after the steps
    frames: int           # frames compiled in all
    opt: object           # the optimizer
    per_fn: dict          # {compiled function's name: frames compiled for it}
    first_frames: int     # frames compiled in all by the end of the first step


def run(name: str, form: str, backend: str, momentum: float, lr_kind: str, compiled: bool,
        sgd_kind: str = "default", steps: int = STEPS, fullgraph: bool = False) -> Run:
    """The parameters after ``steps`` steps, the frames compiled (in all, per compiled
    function: each has its own CompileCounter, and by the end of the first step), the
    optimizer; dynamo's caches are reset first when ``compiled``, so the count is this run's
    alone. ``fullgraph``: compile with fullgraph=True (a graph break raises)."""
    if compiled:
        dynamo.reset()
    m, loss_fn = _model()
    lr = torch.tensor(0.05) if lr_kind == "tensor" else 0.05
    opt = make(name, m.parameters(), lr, momentum, backend, sgd_kind)
    counters: dict = {}

    def comp(f):
        if not compiled:
            return f
        cc = counters[f.__name__] = CompileCounter()
        return torch.compile(f, backend=cc, fullgraph=fullgraph)

    # compiled before the scheduler wraps opt.step (its wrapper is in a file dynamo skips)
    if form == "first+second":
        first, second = comp(opt.first_step), comp(opt.second_step)
    else:
        step = comp(opt.step)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    def one_step():
        if form == "closure":
            step(closure)
        elif form == "first+second":
            opt.zero_grad()
            loss_fn().backward()
            first()
            opt.zero_grad()
            loss_fn().backward()
            second()
        else:
            if form == "perturb+step":
                opt.perturb()
            opt.zero_grad()
            loss_fn().backward()
            step()

    with warnings.catch_warnings():
        # a compiled torch.optim.SGD.step bypasses the scheduler's wrapper, which tells it
        # the step ran: its "scheduler before optimizer" warning is moot here
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
        first_frames = 0
        for i in range(steps):
            one_step()
            sched.step()
            if i == 0:
                first_frames = sum(cc.frame_count for cc in counters.values())
    per_fn = {k: cc.frame_count for k, cc in counters.items()}
    return Run([p.detach().clone() for p in m.parameters()], sum(per_fn.values()), opt, per_fn,
               first_frames)


def row(name, form, backend, momentum, lr_kind, sgd_kind="default") -> dict:
    dynamo.reset()
    out = dict(opt=name if name != "SGD" else f"SGD[{sgd_kind}]", form=form,
               backend=backend if name != "SGD" else "-", momentum=momentum, lr=lr_kind)
    try:
        eager = run(name, form, backend, momentum, lr_kind, False, sgd_kind).params
        got, frames, _, per_fn, _ = run(name, form, backend, momentum, lr_kind, True, sgd_kind)
    except Exception as exc:   # reported in the table
        out.update(frames="-", eq=f"err: {type(exc).__name__}: {str(exc).splitlines()[0][:60]}")
        return out
    finally:
        dynamo.reset()
    d = max(float((a - b).abs().max()) for a, b in zip(eager, got))
    same = all(torch.equal(a, b) for a, b in zip(eager, got))
    if len(per_fn) > 1:
        frames = f"{frames} ({'+'.join(str(n) for n in per_fn.values())})"
    out.update(frames=frames, eq="yes" if same else f"max|d|={d:.2e}")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cpp,reference", help="fused_flat backends, comma-separated")
    ap.add_argument("--opt", default="", help="only these optimizers (comma-separated, e.g. SAM,SGD)")
    ap.add_argument("--why", action="store_true", help="print dynamo's recompile reasons")
    args = ap.parse_args(argv)
    if args.why:
        torch._logging.set_logs(recompiles=True)
    warnings.simplefilter("ignore")
    only = set(filter(None, args.opt.split(",")))
    rows = []
    for lr_kind in ("tensor", "float"):
        for momentum in (0.0, 0.9):
            for name, form in FORMS:
                if only and name not in only:
                    continue
                if name == "SGD":
                    for kind in SGD_KINDS:
                        rows.append(row(name, form, "-", momentum, lr_kind, kind))
                    continue
                for backend in args.backend.split(","):
                    rows.append(row(name, form, backend, momentum, lr_kind))
    cols = ("opt", "form", "backend", "momentum", "lr", "frames", "eq")
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(width[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(width[c]) for c in cols))


if __name__ == "__main__":
    main()
