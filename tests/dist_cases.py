"""The distributed test cases (tests/test_distributed.py): models, data, optimizers and step
functions shared by the 2-process gloo workers and the single-process reference.

Each worker runs many configurations in one process group and saves, per configuration,
the full (unsharded) parameters after the run; the test process computes the same run on
one process with the concatenated batch and compares."""
from __future__ import annotations

import contextlib
import copy
import datetime
import os
import sys
import traceback
import warnings

import torch
from torch import nn

from fused_flat import FSGLD, MSAM, RWP, RWSAM, SAM, SGLD
from fused_flat.optim.buckets import flat_like

WORLD = 2
BATCH = 8          # global batch; each rank takes BATCH // WORLD rows
STEPS = 5
SEED = 1234


def mlp(seed: int = 0, out: int = 3) -> nn.Module:
    """6 -> 7 -> out: dim-0 sizes 7 and 3 shard unevenly over 2 ranks; out=1 leaves rank 1
    an empty shard of the last layer."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, out))


class Branchy(nn.Module):
    """An MLP plus a branch that only some ranks use (find_unused_parameters)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3))
        self.extra = nn.Linear(6, 3)

    def forward(self, x, use_extra: bool = True):
        out = self.body(x)
        return out + self.extra(x) if use_extra else out


def batch(step: int, out: int = 3):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 3, generator=g)[:, :out]


def shard(t: torch.Tensor, rank: int, world: int = WORLD) -> torch.Tensor:
    n = t.shape[0] // world
    return t[rank * n:(rank + 1) * n]


def make_opt(name: str, params):
    if name == "fsgld":
        return FSGLD(params, lr=0.05, beta=1e6, momentum=0.9, seed=SEED)
    if name == "sgld":
        return SGLD(params, lr=0.05, beta=1e6, momentum=0.9, seed=SEED)
    if name == "rwp":
        return RWP(params, lr=0.05, sigma=0.02, momentum=0.9, seed=SEED)
    if name == "sam":
        return SAM(params, lr=0.05, momentum=0.9, rho=0.05)
    if name == "asam":
        return SAM(params, lr=0.05, momentum=0.9, adaptive=True, rho=0.5)
    if name == "msam":
        return MSAM(params, lr=0.05, momentum=0.9, rho=0.05, micro_batch_size=2)
    if name == "rwsam":
        return RWSAM(params, lr=0.05, momentum=0.9, rho=0.05, delta=1e-2, seed=SEED)
    raise ValueError(name)


def mse(out, y):
    return ((out - y) ** 2).mean()


def train_step(name: str, model, opt, x, y, *, micro: int = 1, sync=None, fwd=None):
    """One optimizer step on (x, y). ``micro`` > 1: gradient accumulation over ``micro``
    micro-batches, all but the last backward under ``sync()`` (DDP's no_sync)."""
    fwd = fwd or model
    sync = sync or contextlib.nullcontext

    def backward_all():
        xs, ys = torch.chunk(x, micro), torch.chunk(y, micro)
        total = 0.0
        for i, (xi, yi) in enumerate(zip(xs, ys)):
            ctx = sync() if i < micro - 1 else contextlib.nullcontext()
            with ctx:
                loss = mse(fwd(xi), yi) / micro
                loss.backward()
            total += loss.detach()
        return total

    if name in ("fsgld", "sgld", "rwp"):
        def closure():
            opt.zero_grad()
            return backward_all()
        return opt.step(closure)
    if name in ("sam", "asam"):
        opt.zero_grad()
        backward_all()
        return opt.step(backward_all)
    if name == "msam":
        def mclosure(mb):
            loss = mse(fwd(mb[0]), mb[1])
            loss.backward()
            return loss
        return opt.step(mclosure, (x, y))
    if name == "rwsam":
        return opt.step(lambda: ((fwd(x) - y) ** 2).mean(dim=1))
    raise ValueError(name)


def full_params(model) -> list[torch.Tensor]:
    out = []
    for p in model.parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out.append(t.detach().clone())
    return out


# --------------------------------------------------------------------------- references
def reference(name: str, steps: int = STEPS, msam_micro: int | None = None,
              out: int = 3) -> list[torch.Tensor]:
    """The single-process run on the concatenated batch. ``msam_micro``: MSAM with that
    micro-batch size (the reference of SAM with a local first gradient under DDP)."""
    model = mlp(out=out)
    if msam_micro is not None:
        opt = MSAM(model.parameters(), lr=0.05, momentum=0.9, rho=0.05, micro_batch_size=msam_micro)
    else:
        opt = make_opt(name, model.parameters())
    for k in range(steps):
        x, y = batch(k, out)
        train_step("msam" if msam_micro is not None else name, model, opt, x, y)
    return full_params(model)


# --------------------------------------------------------------------------- workers
DDP_CONFIGS = {   # name: (DDP kwargs, DDP built before the optimizer, micro-batches)
    "after": ({}, False, 1),
    "before": ({}, True, 1),
    "find_unused": ({"find_unused_parameters": True}, False, 1),
    "bucket_view": ({"gradient_as_bucket_view": True}, False, 1),
    "static_graph": ({"static_graph": True}, True, 1),
    "no_sync_accum": ({}, False, 2),
}
COMPARED = ("fsgld", "rwp", "sam")
ALL_OPTS = ("sgld", "fsgld", "rwp", "sam", "asam", "msam", "rwsam")


def _ddp_jobs(rank: int, results: dict) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    def run(key, opt_name, kwargs, before, micro, model_fn=mlp, steps=STEPS, fwd_kw=None):
        model = model_fn()
        if before:
            ddp = DDP(model, **kwargs)
            opt = make_opt(opt_name, ddp.parameters())
        else:
            opt = make_opt(opt_name, model.parameters())
            ddp = DDP(model, **kwargs)
        fwd = (lambda x: ddp(x, **fwd_kw)) if fwd_kw else ddp
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for k in range(steps):
                x, y = batch(k)
                train_step(opt_name, ddp, opt, shard(x, rank), shard(y, rank), micro=micro,
                           sync=ddp.no_sync, fwd=fwd)
        # gradient_as_bucket_view: the kernels read DDP's bucket views in place (no copy)
        no_copy = all(flat_like(p.grad, p).data_ptr() == p.grad.data_ptr()
                      for p in model.parameters() if p.grad is not None)
        results[key] = {"params": full_params(model), "no_copy": no_copy,
                        "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}

    for cfg, (kwargs, before, micro) in DDP_CONFIGS.items():
        for opt_name in COMPARED:
            run(f"{cfg}/{opt_name}", opt_name, kwargs, before, micro)
    for opt_name in ALL_OPTS:
        if opt_name not in COMPARED:
            run(f"after/{opt_name}", opt_name, {}, False, 1)
    # A branch used on rank 1 only (regression: replicas drifted by 0.115 in 3 steps).
    for opt_name in ("fsgld", "sam"):
        run(f"unused_branch/{opt_name}", opt_name, {"find_unused_parameters": True}, False, 1,
            model_fn=Branchy, steps=3, fwd_kw={"use_extra": rank == 1})
    # m-SAM the distributed way: g1 from the local batch (first backward under no_sync).
    model = mlp()
    ddp = DDP(model)
    opt = make_opt("sam", ddp.parameters())
    for k in range(STEPS):
        x, y = batch(k)
        xs, ys = shard(x, rank), shard(y, rank)
        opt.zero_grad()
        with ddp.no_sync():
            mse(ddp(xs), ys).backward()
        opt.step(lambda: mse(ddp(xs), ys).backward())
    results["local_sam/sam"] = {"params": full_params(model), "warnings": []}
    # Seeds: explicit different seeds end up rank 0's, with a warning on the other rank.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        o1 = FSGLD(mlp().parameters(), lr=0.1, seed=100 + rank)
        o2 = RWSAM(mlp().parameters(), delta=1e-2, seed=200 + rank)
    results["seeds"] = {"seeds": [o1.seed, o2.seed],
                        "warnings": [str(w.message) for w in caught if "rank 0" in str(w.message)]}


def _fsdp_model(mesh, out: int = 3, dtype: torch.dtype = torch.float32):
    from torch.distributed.fsdp import fully_shard

    model = mlp(out=out).to(dtype)
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp_jobs(rank: int, results: dict, tmpdir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from fused_flat.distributed import load_checkpoint, save_checkpoint

    mesh = init_device_mesh("cpu", (WORLD,))

    def steps(model, opt, name, ks, out=3):
        for k in ks:
            x, y = batch(k, out)
            train_step(name, model, opt, shard(x, rank), shard(y, rank))

    for name in ALL_OPTS:
        model = _fsdp_model(mesh)
        opt = make_opt(name, model.parameters())
        steps(model, opt, name, range(STEPS))
        results[f"fsdp2/{name}"] = {"params": full_params(model),
                                    "local": [p.to_local().numel() for p in model.parameters()]}
    # Linear(7, 1): rank 1 holds an empty shard of the last layer.
    for name in ("fsgld", "sam"):
        model = _fsdp_model(mesh, out=1)
        opt = make_opt(name, model.parameters())
        steps(model, opt, name, range(STEPS), out=1)
        results[f"fsdp2_empty/{name}"] = {"params": full_params(model),
                                          "local": [p.to_local().numel() for p in model.parameters()]}
    # torch.distributed.checkpoint.state_dict helpers: a clear error, not a silent step.
    from torch.distributed.checkpoint.state_dict import get_state_dict

    errors = {}
    for name in ("sgld", "fsgld", "sam"):
        model = _fsdp_model(mesh)
        opt = make_opt(name, model.parameters())
        try:
            get_state_dict(model, opt)
            errors[name] = None
        except RuntimeError as exc:
            errors[name] = (str(exc), opt.step_count)
    results["get_state_dict"] = errors
    # DCP checkpoint: 5 steps, save, fresh model + optimizer, load, 5 more == 10 straight.
    for name in ("fsgld", "sam"):
        model = _fsdp_model(mesh)
        opt = make_opt(name, model.parameters())
        steps(model, opt, name, range(10))
        straight = full_params(model)
        model = _fsdp_model(mesh)
        opt = make_opt(name, model.parameters())
        steps(model, opt, name, range(5))
        path = os.path.join(tmpdir, f"ckpt_{name}")
        save_checkpoint(path, model, opt, extra={"step": 5})
        model = _fsdp_model(mesh)
        opt = make_opt(name, model.parameters())
        extra = load_checkpoint(path, model, opt, extra={"step": 0})
        steps(model, opt, name, range(extra["step"], 10))
        resumed = full_params(model)
        # In-memory state_dict with DTensor momentum, for comparison
        mom = [type(opt.state[p]["momentum_buffer"]).__name__ for p in model.parameters()]
        results[f"ckpt/{name}"] = {"straight": straight, "resumed": resumed, "mom_types": mom,
                                   "k": opt.step_count}
    # state_dict / load_state_dict (no DCP) with DTensor momentum buffers.
    model = _fsdp_model(mesh)
    opt = make_opt("fsgld", model.parameters())
    steps(model, opt, "fsgld", range(3))
    sd = copy.deepcopy(opt.state_dict())   # state_dict() holds the live buffers, as torch.optim's
    assert type(sd["state"][0]["momentum_buffer"]).__name__ == "DTensor"
    model2 = _fsdp_model(mesh)
    model2.load_state_dict(model.state_dict())
    opt2 = make_opt("fsgld", model2.parameters())
    opt2.load_state_dict(sd)
    steps(model, opt, "fsgld", range(3, 5))
    steps(model2, opt2, "fsgld", range(3, 5))
    results["state_dict/fsgld"] = {"a": full_params(model), "b": full_params(model2)}
    # A non-finite gradient in one rank's shard only: every rank skips the step.
    model = _fsdp_model(mesh)
    opt = make_opt("fsgld", model.parameters())
    x, y = batch(0)

    def bad_closure():
        opt.zero_grad()
        loss = mse(model(shard(x, rank)), shard(y, rank))
        loss.backward()
        if rank == 1:
            model[2].weight.grad.to_local().view(-1)[0] = float("nan")
        return loss

    before = full_params(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(bad_closure)
    results["nan_skip/fsgld"] = {"skipped": opt.skipped_steps, "before": before,
                                 "after": full_params(model)}


# --------------------------------------------------------------------------- DCP resume
# 3 steps, save_checkpoint, 3 more (uninterrupted); fresh model + optimizer + scheduler,
# load_checkpoint, the same 3 steps (resumed): parameters and whole optimizer state must be
# bitwise equal. One process (tests/test_dcp_resume.py) and FSDP2 (job "fsdp2_resume").
RESUME_CASES = {   # name: (parameter dtype, the train_step name)
    "fsgld_bf16_masters": (torch.bfloat16, "fsgld"),
    "sam_adamw": (torch.float32, "sam"),
}
RESUME_SAVED_AT, RESUME_STEPS = 3, 6


def make_resume(case: str, model):
    """The optimizer and LR scheduler of a resume case: FSGLD on bf16 parameters with fp32
    master weights and momentum; SAM over torch.optim.AdamW (exp_avg, exp_avg_sq, 0-dim
    step). The scheduler changes the lr every 2 steps (so the saved lr is not the initial one)."""
    if case == "fsgld_bf16_masters":
        opt = FSGLD(model.parameters(), lr=0.05, beta=1e6, momentum=0.9, master_weights=True,
                    seed=SEED)
    elif case == "sam_adamw":
        opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=0.01, weight_decay=0.01)
    else:
        raise ValueError(case)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def _full(t):
    if isinstance(t, torch.Tensor):
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()
    return t


def resume_snapshot(model, opt) -> dict:
    """Full parameters and the whole optimizer state (by parameter name, DTensors gathered;
    "types": each state entry's type before gathering)."""
    from fused_flat.distributed import optim_state_dict

    osd = optim_state_dict(model, opt)
    return {"params": full_params(model),
            "state": {n: {k: _full(v) for k, v in st.items()} for n, st in osd["state"].items()},
            "param_groups": osd["param_groups"], "fused_flat": osd["fused_flat"],
            "types": {n: {k: type(v).__name__ for k, v in st.items()}
                      for n, st in osd["state"].items()}}


def resume_run(case: str, model_fn, path: str, rank: int | None = None) -> dict:
    """{"straight", "resumed"} snapshots of a resume case; ``model_fn(dtype)`` builds the
    model (FSDP2-sharded or not); ``rank``: train on that rank's shard of each batch."""
    from fused_flat.distributed import load_checkpoint, save_checkpoint

    dtype, name = RESUME_CASES[case]

    def train(model, opt, sched, ks):
        for k in ks:
            x, y = batch(k)
            if rank is not None:
                x, y = shard(x, rank), shard(y, rank)
            train_step(name, model, opt, x.to(dtype), y.to(dtype))
            sched.step()

    model = model_fn(dtype)
    opt, sched = make_resume(case, model)
    train(model, opt, sched, range(RESUME_SAVED_AT))
    save_checkpoint(path, model, opt, extra={"sched": sched.state_dict(), "step": RESUME_SAVED_AT})
    train(model, opt, sched, range(RESUME_SAVED_AT, RESUME_STEPS))
    straight = resume_snapshot(model, opt)
    model = model_fn(dtype)
    opt, sched = make_resume(case, model)
    extra = load_checkpoint(path, model, opt, extra={"sched": sched.state_dict(), "step": 0})
    sched.load_state_dict(extra["sched"])
    train(model, opt, sched, range(extra["step"], RESUME_STEPS))
    return {"straight": straight, "resumed": resume_snapshot(model, opt)}


def _fsdp_resume_jobs(rank: int, results: dict, tmpdir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    for case in RESUME_CASES:
        path = os.path.join(tmpdir, f"ckpt_{case}")
        results[case] = resume_run(case, lambda dtype: _fsdp_model(mesh, dtype=dtype), path, rank)


JOBS = {"ddp": _ddp_jobs, "fsdp2": _fsdp_jobs, "fsdp2_resume": _fsdp_resume_jobs}


def worker(rank: int, job: str, store_path: str, outdir: str) -> None:
    """Entry point of a spawned rank: runs JOBS[job], saves the results to
    outdir/rank{rank}.pt, destroys the process group."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=30))
    try:
        results: dict = {}
        if job == "ddp":
            _ddp_jobs(rank, results)
        else:
            JOBS[job](rank, results, outdir)
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        dist.barrier()   # no rank tears the group (and the store) down while another uses it
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        raise
    finally:
        dist.destroy_process_group()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
