"""End-to-end training-step benchmark: fused_flat optimizers vs SGD and unfused peers.

Models: torchvision ResNet-18 (num_classes=10) on CIFAR-shaped batches (3x32x32), and a
small GPT-style stack of pre-norm transformer blocks (causal next-token loss). The data
are SYNTHETIC (random images / tokens and labels, generated once, no download): only the
speed is measured, never accuracy.

Optimizers (same lr / weight decay / momentum for all; the paper's fSGLD setting is momentum 0):
SGD (torch.optim.SGD, foreach), SGLD, FSGLD (fused, backend auto), RWP, fSGLD paper-style
(benchmarks.baselines.PaperFSGLD), SAM davda54-style (benchmarks.baselines.DavdaSAM), and
SAM / ASAM / RW-SAM from fused_flat.optim.sam when it is importable (skipped with a note if not).

Protocol: every optimizer gets its own copy of the same initial model, all in one process;
warm-up rounds, then timed rounds in which the optimizers take turns (the order rotates
every round) so that machine drift hits all of them alike. Reported per optimizer: median
seconds per step (forward + backward(s) + optimizer), samples/s, ratio to SGD measured in
the same run, and memory:

* ``state_MiB``: bytes of params + grads + every tensor the optimizer holds (momentum,
  buckets, backups, SAM's old weights), counted once per storage; a gradient that is None
  at the time of counting is counted as param-sized (it exists during the step).
  ``extra_MiB`` = state_MiB minus params and grads (what the optimizer adds).
* ``peak_step_extra_MiB`` (GPU only): torch.cuda.max_memory_allocated during one step
  minus the memory allocated before it (activations + temporaries such as randn_like).
  On CPU there is no allocator counter for torch; that column is empty.

Usage: python -m fused_flat bench e2e [--quick] [--models resnet18,gpt] [--steps 10]
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))

import argparse
import copy
import gc
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks import baselines, common

ALL_OPTIMIZERS = ("SGD", "SGLD", "FSGLD", "FSGLD-paper", "RWP", "SAM-davda54", "SAM", "ASAM", "RW-SAM")


# ----------------------------------------------------------------------------- models
class GPTStack(nn.Module):
    """Token + position embeddings, pre-norm causal transformer blocks, LM head."""

    def __init__(self, vocab: int = 1024, d: int = 256, layers: int = 4, heads: int = 4, seq: int = 64):
        super().__init__()
        self.seq = seq
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        h = self.tok(idx) + self.pos[:t]
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


@dataclass
class Workload:
    name: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    batch_size: int
    description: str

    def loss(self, model: nn.Module, batch, reduction: str = "mean") -> torch.Tensor:
        x, y = batch
        out = model(x)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction=reduction)

    def per_sample_loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        out = model(x)
        losses = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none")
        return losses.reshape(x.shape[0], -1).mean(1)


def workloads(args, device: torch.device) -> dict[str, Workload]:
    gpu = device.type == "cuda"
    q = args.quick
    out = {}
    bs_r = args.batch_size or (2 if q else 128 if gpu else 32)

    def resnet():
        import torchvision

        return torchvision.models.resnet18(num_classes=10)

    def resnet_batch(g):
        x = torch.randn(bs_r, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (bs_r,), generator=g)
        return x, y

    out["resnet18"] = Workload("resnet18", resnet, resnet_batch, bs_r,
                               f"torchvision ResNet-18, 10 classes, synthetic 3x32x32, batch {bs_r}")
    if q:
        cfg = dict(vocab=128, d=32, layers=1, heads=2, seq=16)
        bs_g = args.batch_size or 2
    elif gpu:
        cfg = dict(vocab=8192, d=512, layers=8, heads=8, seq=256)
        bs_g = args.batch_size or 32
    else:
        cfg = dict(vocab=1024, d=256, layers=4, heads=4, seq=64)
        bs_g = args.batch_size or 16

    def gpt_batch(g):
        idx = torch.randint(0, cfg["vocab"], (bs_g, cfg["seq"] + 1), generator=g)
        return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()

    out["gpt"] = Workload("gpt", lambda: GPTStack(**cfg), gpt_batch, bs_g,
                          f"GPT-style stack d={cfg['d']} layers={cfg['layers']} heads={cfg['heads']} "
                          f"seq={cfg['seq']} vocab={cfg['vocab']}, synthetic tokens, batch {bs_g}")
    return out


# ----------------------------------------------------------------------------- optimizers
@dataclass
class Entry:
    name: str
    model: nn.Module
    opt: object
    step: Callable[[object], torch.Tensor]   # step(batch) -> loss
    times: list = field(default_factory=list)
    last_loss: float = float("nan")


def _sam_module():
    try:
        import fused_flat.optim as sam
    except ImportError as exc:
        return None, f"fused_flat.optim.sam is not importable ({exc})"
    return sam, None


def build_entry(name: str, model: nn.Module, wl: Workload, args) -> Entry:
    """One optimizer on its own model copy; raises (with the reason) when it cannot run."""
    import fused_flat

    params = [p for p in model.parameters() if p.requires_grad]
    hp = dict(lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum)

    def plain(opt):
        def step(batch):
            opt.zero_grad()
            loss = wl.loss(model, batch)
            loss.backward()
            opt.step()
            return loss
        return step

    def closure_form(opt):
        def step(batch):
            def closure():
                opt.zero_grad()
                loss = wl.loss(model, batch)
                loss.backward()
                return loss
            return opt.step(closure)
        return step

    if name == "SGD":
        opt = torch.optim.SGD(params, **hp)
        return Entry(name, model, opt, plain(opt))
    if name == "SGLD":
        opt = fused_flat.SGLD(params, beta=args.beta, backend=args.backend, **hp)
        return Entry(name, model, opt, plain(opt))
    if name == "FSGLD":
        opt = fused_flat.FSGLD(params, beta=args.beta, backend=args.backend, **hp)
        return Entry(name, model, opt, closure_form(opt))
    if name == "RWP":
        opt = fused_flat.RWP(params, sigma=args.rwp_sigma, backend=args.backend, **hp)
        return Entry(name, model, opt, closure_form(opt))
    if name == "FSGLD-paper":
        opt = baselines.PaperFSGLD(params, beta=args.beta, **hp)

        def step(batch):
            def closure():
                loss = wl.loss(model, batch)
                loss.backward()
                return loss
            return opt.step(closure)
        return Entry(name, model, opt, step)
    if name == "SAM-davda54":
        opt = baselines.DavdaSAM(params, torch.optim.SGD, rho=args.rho, **hp)

        def step(batch):
            loss = wl.loss(model, batch)
            loss.backward()
            opt.first_step(zero_grad=True)
            wl.loss(model, batch).backward()
            opt.second_step(zero_grad=True)
            return loss
        return Entry(name, model, opt, step)
    if name in ("SAM", "ASAM", "RW-SAM"):
        return _build_fused_sam(name, model, params, wl, args, hp)
    raise ValueError(f"unknown optimizer {name!r}; choose from {ALL_OPTIMIZERS}")


def _build_fused_sam(name, model, params, wl, args, hp) -> Entry:
    """Adapter to fused_flat.optim.sam: SAM / ASAM (SAM(adaptive=True), rho 2.0) take the caller's
    first forward/backward and a closure for the second (davda54's convention); RWSAM's
    closure returns the per-sample losses and the optimizer runs every pass itself."""
    sam, why = _sam_module()
    if sam is None:
        raise RuntimeError(why)
    if name == "RW-SAM":
        opt = sam.RWSAM(params, torch.optim.SGD, rho=args.rho, delta=1e-3, **hp)

        def step(batch):
            return opt.step(lambda: wl.per_sample_loss(model, batch))
        return Entry(name, model, opt, step)
    adaptive = name == "ASAM"
    opt = sam.SAM(params, torch.optim.SGD, rho=2.0 if adaptive else args.rho, adaptive=adaptive, **hp)

    def step(batch):
        opt.zero_grad()
        loss = wl.loss(model, batch)
        loss.backward()

        def closure():
            second = wl.loss(model, batch)
            second.backward()
            return second
        opt.step(closure)
        return loss.detach()
    return Entry(name, model, opt, step)


# ----------------------------------------------------------------------------- memory
def _walk_tensors(obj, seen: set, out: list, depth: int = 0) -> None:
    if depth > 5 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        if obj.grad is not None:
            out.append(obj.grad)
        return
    if isinstance(obj, nn.Module):
        return
    if isinstance(obj, dict):
        for v in obj.values():
            _walk_tensors(v, seen, out, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            _walk_tensors(v, seen, out, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for v in vars(obj).values():
            _walk_tensors(v, seen, out, depth + 1)


def _storage_bytes(tensors) -> dict:
    acc = {}
    for t in tensors:
        try:
            st = t.untyped_storage()
            acc[(t.device.type, st.data_ptr())] = st.nbytes()
        except Exception:
            continue
    return acc


def memory_of(e: Entry) -> dict:
    params = [p for p in e.model.parameters()]
    base = _storage_bytes(params + [p.grad for p in params if p.grad is not None])
    missing_grads = sum(p.numel() * p.element_size() for p in params if p.requires_grad and p.grad is None)
    found: list = []
    _walk_tensors(e.opt, set(), found)
    everything = dict(base)
    everything.update(_storage_bytes(found))
    total = sum(everything.values()) + missing_grads
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    return {"state_MiB": total / 2 ** 20, "extra_MiB": round((total - 2 * param_bytes) / 2 ** 20, 3),
            "params_MiB": param_bytes / 2 ** 20}


# ----------------------------------------------------------------------------- run
def run_workload(wl: Workload, names: list[str], device: torch.device, args) -> tuple[list[dict], list[str]]:
    notes = []
    torch.manual_seed(0)
    base = wl.make_model().to(device)
    g = torch.Generator().manual_seed(0)
    batches = [tuple(t.to(device) for t in wl.make_batch(g)) for _ in range(args.batches)]
    entries: list[Entry] = []
    for name in names:
        model = copy.deepcopy(base)
        model.train()
        try:
            entries.append(build_entry(name, model, wl, args))
        except Exception as exc:
            notes.append(f"{wl.name}: {name} skipped: {type(exc).__name__}: {exc}")
    del base
    # warm-up (also builds lazily allocated state: momentum, SAM backups, ...)
    failed = set()
    for w in range(args.warmup):
        for e in entries:
            if e.name in failed:
                continue
            try:
                e.step(batches[w % len(batches)])
            except Exception as exc:
                failed.add(e.name)
                notes.append(f"{wl.name}: {e.name} failed in warm-up: {type(exc).__name__}: {exc}")
    entries = [e for e in entries if e.name not in failed]
    common.sync(device)
    for r in common.progress(range(args.steps), desc=f"{wl.name} ({len(entries)} optimizers)"):
        k = r % max(1, len(entries))
        for e in entries[k:] + entries[:k]:
            batch = batches[(args.warmup + r) % len(batches)]
            common.sync(device)
            t0 = time.perf_counter()
            loss = e.step(batch)
            common.sync(device)
            e.times.append(time.perf_counter() - t0)
            if r == args.steps - 1 and loss is not None:
                e.last_loss = float(loss.detach())
    rows = []
    for e in entries:
        med = common.median(e.times)
        row = {"model": wl.name, "optimizer": e.name, "batch": wl.batch_size, "median_s": med,
               "min_s": min(e.times), "steps_timed": len(e.times), "samples_per_s": wl.batch_size / med,
               "backend": _backend_of(e.opt), "final_loss": e.last_loss}
        row.update(memory_of(e))
        row["peak_step_extra_MiB"] = _gpu_peak(e, batches[0], device) if device.type == "cuda" else None
        if not math.isfinite(e.last_loss):
            notes.append(f"{wl.name}: {e.name} ended with a non-finite loss ({e.last_loss})")
        rows.append(row)
    sgd = next((r["median_s"] for r in rows if r["optimizer"] == "SGD"), None)
    for r in rows:
        r["x_sgd"] = r["median_s"] / sgd if sgd else None
    del entries, batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, notes


def _backend_of(opt) -> str:
    bks = getattr(opt, "_backends", None)
    if bks:
        return ",".join(sorted({b.name for b in bks}))
    return "torch"


def _gpu_peak(e: Entry, batch, device) -> float:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    e.step(batch)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20


# ----------------------------------------------------------------------------- output
COLS = [("model", "model"), ("optimizer", "optimizer"), ("backend", "backend"), ("median_s", "s/step"),
        ("x_sgd", "x SGD"), ("samples_per_s", "samples/s"), ("state_MiB", "params+grads+state MiB"),
        ("extra_MiB", "optimizer extra MiB"), ("peak_step_extra_MiB", "GPU peak step extra MiB"),
        ("steps_timed", "steps"), ("final_loss", "final loss")]


def _plot(rows: list[dict], path: Path, title: str) -> Path | None:
    plt = common.plt()
    if plt is None or not rows:
        return None
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, m in zip(axes[0], models):
        rs = [r for r in rows if r["model"] == m]
        names = [r["optimizer"] for r in rs]
        vals = [r["median_s"] for r in rs]
        colors = ["tab:gray" if n == "SGD" else "tab:red" if ("paper" in n or "davda" in n) else "tab:blue"
                  for n in names]
        bars = ax.bar(names, vals, color=colors)
        for b, r in zip(bars, rs):
            if r.get("x_sgd"):
                ax.annotate(f"{r['x_sgd']:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("median s/step")
        ax.set_title(f"{m} (batch {rs[0]['batch']})")
        ax.tick_params(axis="x", rotation=35)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summarize(rows: list[dict]) -> list[str]:
    """Per model: the fused optimizers against their unfused peers, measured in the same run."""
    out = []
    for m in dict.fromkeys(r["model"] for r in rows):
        by = {r["optimizer"]: r for r in rows if r["model"] == m}
        for fused, peer in (("FSGLD", "FSGLD-paper"), ("SAM", "SAM-davda54")):
            if fused in by and peer in by:
                f, p = by[fused], by[peer]
                out.append(f"- {m}: {fused} {f['median_s']:.3g} s/step = {f['x_sgd']:.2f}x SGD; {peer} "
                           f"{p['median_s']:.3g} s/step = {p['x_sgd']:.2f}x SGD; {fused} runs at "
                           f"{p['median_s'] / f['median_s']:.2f}x the speed of {peer}")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="fused-flat bench e2e", description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,gpt")
    ap.add_argument("--optimizers", default=",".join(ALL_OPTIMIZERS))
    ap.add_argument("--batch-size", type=int, default=None, help="default: 32 (CPU) / 128 (GPU) for ResNet, "
                                                                 "16 / 32 for the GPT stack")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per optimizer (default 10 CPU, 30 GPU)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per optimizer (default 2 CPU, 5 GPU)")
    ap.add_argument("--batches", type=int, default=4, help="synthetic batches cycled through")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--momentum", type=float, default=0.0)
    ap.add_argument("--beta", type=float, default=1e8)
    ap.add_argument("--rwp-sigma", type=float, default=0.01)
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--backend", default="auto", help="backend of the fused optimizers")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--quick", action="store_true", help="tiny models, 1 warm-up and 1 timed step (smoke test)")
    ap.add_argument("--out", default=str(common.DEFAULT_OUT))
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = common.resolve_device(args.device)
    gpu = dev.type == "cuda"
    if args.steps is None:
        args.steps = 1 if args.quick else 30 if gpu else 10
    if args.warmup is None:
        args.warmup = 1 if args.quick else 5 if gpu else 2
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    for n in names:
        if n not in ALL_OPTIMIZERS:
            raise SystemExit(f"unknown optimizer {n!r}; choose from {', '.join(ALL_OPTIMIZERS)}")
    if "SGD" not in names:
        names.insert(0, "SGD")   # the ratios need it
    wls = workloads(args, dev)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in wls:
            raise SystemExit(f"unknown model {m!r}; choose from {', '.join(wls)}")

    meta = common.machine_info(dev)
    print(common.meta_line(meta))
    print("SYNTHETIC data (random inputs and labels, no download): speed only, not accuracy.")
    rows, notes = [], []
    sam, why = _sam_module()
    if sam is None:
        notes.append(f"SAM/ASAM/RW-SAM (fused_flat.optim.sam) skipped: {why}")
        names = [n for n in names if n not in ("SAM", "ASAM", "RW-SAM")]
    with warnings.catch_warnings():
        warnings.simplefilter("once")
        for m in models:
            r, n = run_workload(wls[m], names, dev, args)
            rows += r
            notes += n

    out = Path(args.out)
    config = {k: v for k, v in vars(args).items()}
    config["workloads"] = {m: wls[m].description for m in models}
    payload = {"meta": meta, "config": config, "synthetic_data": True, "notes": notes, "rows": rows,
               "memory_definition": "state_MiB = params + grads + optimizer-held tensors (unique storages); "
                                    "peak_step_extra_MiB = CUDA max_memory_allocated during a step minus "
                                    "allocated before it (GPU only)"}
    paths = [out / "e2e.json", out / "e2e.csv", out / "e2e.md"]
    common.write_json(paths[0], payload)
    common.write_csv(paths[1], rows, meta)
    md = ["# fused_flat end-to-end training step benchmark", "", common.meta_line(meta), "",
          "**Synthetic data** (random inputs/labels generated once; no download): speed only.",
          f"Hyperparameters: lr {args.lr}, weight decay {args.weight_decay}, momentum {args.momentum}, "
          f"beta {args.beta}, RWP sigma {args.rwp_sigma}, SAM rho {args.rho}; fused backend '{args.backend}'.",
          f"Timing: {args.warmup} warm-up + {args.steps} timed steps per optimizer, optimizers interleaved "
          f"(rotating order) in one process; median s/step; 'x SGD' = ratio to SGD in the same run.",
          "Memory: 'params+grads+state' counts params, grads and optimizer-held tensors once per storage; "
          "'optimizer extra' = that minus params and grads; GPU peak = max_memory_allocated during a step "
          "minus allocated before it (empty on CPU).", ""]
    for m in models:
        md.append(f"- {m}: {wls[m].description}")
    md += ["", common.markdown_table(rows, COLS), ""]
    reading = summarize(rows)
    if reading:
        md += ["Reading:", *reading, ""]
    if notes:
        md += ["Notes:", *[f"- {n}" for n in notes], ""]
    text = "\n".join(md)
    paths[2].write_text(text)
    print(text)
    if not args.no_plot:
        p = _plot(rows, out / "e2e_step_time.png", common.meta_line(meta))
        if p:
            paths.append(p)
    common.announce(paths)
    return payload


if __name__ == "__main__":
    main()
