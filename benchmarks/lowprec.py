"""16-bit parameters (issue 13): does fSGLD in bf16 sample what it samples in fp32?

Usage: python -m fused_flat bench lowprec [--quick] [--out DIR] [--threads 2] [--parts walk,dw,gpt,mem]

Modes compared (fused_flat.FSGLD, momentum 0 unless stated):

* ``fp32``                  fp32 parameters, the reference.
* ``bf16 master``           ``master_weights=True``: fp32 masters in ``state[p]["master_weight"]``.
* ``bf16 default``          stochastic rounding of the update (``stochastic_rounding=None``), exact
                            restore from a 2-byte backup. Where the backend has no SR kernels yet,
                            the optimizer warns and rounds to nearest: these rows are then labelled
                            "pending SR kernels" and show round-to-nearest behaviour.
* ``bf16 nearest``          ``stochastic_rounding=False``: round to nearest.
* ``SR emulated``           (walk and double well only) NOT the library: a few lines of torch that
                            apply ALGORITHMS.md §1's bf16 stochastic rounding (add 16 random bits to
                            the fp32 pattern, truncate) to the same update with torch's generator, a
                            preview of the SR rows until the kernels are merged.

Parts (each writes its files under --out, default results/lowprec/):

1. ``walk``: the paper regime. beta = 1e8, lr = 0.1, eta = 0.01 (sigma = 0.0095), n bf16 weights
   all 0.05 (bf16 ulp there 2^-12 = 2.44e-4; Langevin noise per step sqrt(2 lr / beta) = 4.5e-5
   = 0.18 ulp), zero gradient, K steps. The walk w_K - w_0 should have variance 2 lr K / beta;
   reported as a ratio to it (standard error sqrt(2 / (n - 1))), with the fraction of weights
   that never moved. -> walk.csv
2. ``dw``: a double well with a closed-form fSGLD target. u(x) = A ((x - c)^2 / s^2 - 1)^2 (the
   quartic (y^2 - 1)^2 in y = (x - c) / s), c = 1.5: the chains live in [1, 2) where the bf16 ulp
   is 2^-7, and with s = 0.0625 the Langevin noise per step is 0.36 ulp (the paper regime:
   0.18 ulp; --dw-s 0.125 gives 0.72 ulp). fSGLD takes the gradient at x + sigma eps, so its continuous-time law is
   exp(-beta u_sigma) with u_sigma(x) = E u(x + sigma z) = A (y^4 + (6 sy^2 - 2) y^2 + 3 sy^4
   - 2 sy^2 + 1), sy = sigma / s. sigma = s * sigma_y, beta = sigma^(-4 / (1 + eta)) (coupled, as
   FSGLD does), A = barrier / (1 - 3 sy^2)^2 / beta so that the barrier of beta u_sigma is
   --dw-barrier kT, and lr = h s^2 beta, so that h is the step of dY = -(beta u_sigma)'(Y) dT +
   sqrt(2) dW in y and the run covers T = h K of that time (the well-to-well rate is ~1). Many chains
   = the elements of ONE parameter tensor, all started in the right-hand well; the closure
   writes p.grad = u'(p) at the perturbed point. Reported: W1 of the final states to the target
   (the integral of |F_n - F| with the target's CDF F on a 400k-point grid, exact up to the grid
   spacing), the mass in the right well (target 0.5), the standard deviation; the
   sampling floor (W1 of n exact iid draws), the bf16 lattice floor (those draws rounded to
   bf16: no chain on bf16 values gets closer), and for bf16 weights the W1 to the bf16-rounded
   target (the law of round(X), X ~ target: what a bf16 chain at best samples); fp32 at 2 h
   (the discretisation bias grows with h) and every row against the UNsmoothed law
   exp(-beta u). -> double_well.csv, double_well.png
3. ``gpt``: the GPT stack of benchmarks/e2e.py (smaller config) trained in pure bf16 with FSGLD
   (beta 1e8, lr 0.1, weight decay 5e-4: the paper's setting) on a synthetic but learnable token
   stream: a fixed random Markov chain (each token has 4 successors), so the loss has a floor,
   its entropy rate. Same init, same batches in every mode. Training loss (at the perturbed
   point, as the closure returns it) every step, held-out loss (unperturbed weights) every
   --gpt-eval-every steps. -> gpt_curves.csv, gpt_final.csv, gpt_loss.png
4. ``mem``: bytes per parameter the optimizer holds (state tensors + restore backups, unique
   storages, after 2 steps) in every mode, with and without momentum. -> memory.csv

Everything goes to lowprec.json (with the machine) and lowprec.md (the tables).
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import common

BF16 = torch.bfloat16
PENDING = "pending SR kernels"


# ----------------------------------------------------------------------------- modes
def sr_kernels(backend: str) -> bool:
    """Whether the backend that runs a CPU bf16 bucket can round stochastically."""
    from fused_flat import backends

    return bool(backends.resolve(backend, torch.empty(1, dtype=BF16)).stochastic_rounding)


def modes(backend: str) -> list[dict]:
    """The optimizer modes: name, parameter dtype, FSGLD keyword arguments, label."""
    sr = sr_kernels(backend)
    return [
        dict(name="fp32", dtype=torch.float32, kw={}, label="fp32"),
        dict(name="bf16 master", dtype=BF16, kw=dict(master_weights=True), label="bf16 master_weights=True"),
        dict(name="bf16 default", dtype=BF16, kw={},
             label="bf16 default (stochastic rounding)" if sr else f"bf16 default ({PENDING}: rounds to nearest)"),
        dict(name="bf16 nearest", dtype=BF16, kw=dict(stochastic_rounding=False),
             label="bf16 stochastic_rounding=False"),
    ]


def sr_round_bf16(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Emulation of ALGORITHMS.md §1's bf16 stochastic rounding (not the library's kernel):
    add 16 random bits to the fp32 bit pattern and truncate the low 16 bits."""
    x = x.float().contiguous()
    r = torch.randint(0, 1 << 16, x.shape, generator=gen, dtype=torch.int32)
    bits = (x.view(torch.int32) + r) & ~0xFFFF
    out = bits.view(torch.float32)
    out = torch.where(torch.isfinite(x), out, x)
    return out.to(BF16)   # exact: the low 16 bits are zero


# ----------------------------------------------------------------------------- 1. walk
def part_walk(args) -> list[dict]:
    import fused_flat

    beta, lr, w0, n, K = 1e8, 0.1, 0.05, args.walk_n, args.walk_steps
    target = 2 * lr * K / beta
    se = math.sqrt(2 / (n - 1))
    start = torch.full((n,), w0, dtype=BF16).double()
    rows = []

    def row(mode, label, measured_on, walk, pending=False, sec=None):
        walk = walk.double()
        return {"mode": mode, "label": label, "measured_on": measured_on, "n": n, "steps": K,
                "target_var": target, "var": walk.var().item(), "ratio": walk.var().item() / target,
                "ratio_se": se, "mean_over_sqrt_target": walk.mean().item() / math.sqrt(target),
                "frac_unmoved": (walk == 0).double().mean().item(), "pending_sr": pending,
                "sec": sec}

    for m in modes(args.backend):
        if m["dtype"] == torch.float32:
            w = nn.Parameter(torch.full((n,), w0, dtype=BF16).float())   # the same start
        else:
            w = nn.Parameter(torch.full((n,), w0, dtype=BF16))
        opt = fused_flat.FSGLD([w], lr=lr, beta=beta, seed=args.seed, backend=args.backend, **m["kw"])

        def closure():
            w.grad = torch.zeros_like(w)
            return torch.zeros(())

        t0 = time.perf_counter()
        for _ in range(K):
            opt.step(closure)
        sec = time.perf_counter() - t0
        pending = m["name"] == "bf16 default" and not sr_kernels(args.backend)
        if m["name"] == "bf16 master":
            rows.append(row(m["name"], m["label"], "fp32 master", opt.state[w]["master_weight"] - start, sec=sec))
        rows.append(row(m["name"], m["label"], "weights", w.detach() - start, pending, sec))
    # emulated SR: the same update (zero gradient: theta + noise) rounded stochastically
    gen = torch.Generator().manual_seed(args.seed)
    w = torch.full((n,), w0, dtype=BF16)
    std = math.sqrt(2 * lr / beta)
    t0 = time.perf_counter()
    for _ in range(K):
        xi = torch.randn(n, generator=gen)
        w = sr_round_bf16(w.float() + std * xi, gen)
    rows.append(row("SR emulated", "bf16 SR emulated in torch (not the library)", "weights", w - start,
                    sec=time.perf_counter() - t0))
    return rows


# ----------------------------------------------------------------------------- 2. double well
class DoubleWell:
    """u(x) = A ((x - c)^2 / s^2 - 1)^2 and its N(0, sigma^2)-smoothing, in closed form."""

    def __init__(self, c: float, s: float, sigma_y: float, barrier: float, h: float, eta: float = 0.01):
        self.c, self.s, self.sy, self.eta, self.h = c, s, sigma_y, eta, h
        self.sigma = s * sigma_y
        self.beta = self.sigma ** (-4.0 / (1.0 + eta))       # FSGLD's coupling, inverted
        if not 3 * sigma_y ** 2 < 1:
            raise ValueError("sigma_y must be < 1/sqrt(3) for the smoothed law to stay bimodal")
        self.A = barrier / (1 - 3 * sigma_y ** 2) ** 2 / self.beta   # smoothed barrier = barrier / beta
        self.lr = h * s * s * self.beta
        self.y_min = math.sqrt(1 - 3 * sigma_y ** 2)           # minima of u_sigma in y
        self._cache: dict = {}

    def y(self, x):
        return (x - self.c) / self.s

    def u(self, x):
        y = self.y(x)
        return self.A * (y * y - 1) ** 2

    def u_sigma(self, x):
        y, v = self.y(x), self.sy ** 2
        return self.A * (y ** 4 + (6 * v - 2) * y * y + 3 * v * v - 2 * v + 1)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        y = (x - self.c) / self.s
        return 4 * self.A * y * (y * y - 1) / self.s

    def grid(self, n: int = 400_001):
        import numpy as np

        return np.linspace(self.c - 4 * self.s, self.c + 4 * self.s, n)

    def density(self, smoothed: bool = True):
        """(grid, density on it), normalised; cached."""
        import numpy as np

        key = bool(smoothed)
        if key not in self._cache:
            x = self.grid()
            e = self.beta * (self.u_sigma(x) if smoothed else self.u(x))
            p = np.exp(-(e - e.min()))
            p /= p.sum() * (x[1] - x[0])
            cdf = np.cumsum(p) * (x[1] - x[0])
            self._cache[key] = (x, p, cdf / cdf[-1])
        return self._cache[key][:2]

    def cdf(self, smoothed: bool = True):
        self.density(smoothed)
        x, _, c = self._cache[bool(smoothed)]
        return x, c

    def sample(self, n: int, rng, smoothed: bool = True):
        """Exact draws by inverse CDF on the grid."""
        import numpy as np

        x, cdf = self.cdf(smoothed)
        return np.interp(rng.random(n), cdf, x)

    def w1(self, samples, smoothed: bool = True) -> float:
        """W1 = integral of |F_n - F| over the grid (exact up to the grid spacing, 2e-5 s);
        samples outside the grid (none in practice: beta u is > 400 kT there) count at its ends."""
        import numpy as np

        x, cdf = self.cdf(smoothed)
        emp = np.searchsorted(np.sort(np.asarray(samples, dtype=np.float64)), x, side="right") / len(samples)
        return float(np.abs(emp - cdf).sum() * (x[1] - x[0]))

    def w1_lattice(self, samples) -> float:
        """W1 to the law of round_bf16(X), X ~ exp(-beta u_sigma): the best law a chain that
        lives on the bf16 values can have (exact on the grid)."""
        import numpy as np

        x, p = self.density()
        r = torch.from_numpy(x).to(BF16).double().numpy()          # the bf16 value each x rounds to
        vals, inv = np.unique(r, return_inverse=True)
        cum = np.cumsum(np.bincount(inv, weights=p * (x[1] - x[0])))
        k = np.searchsorted(vals, x, side="right") - 1
        lat = np.where(k >= 0, cum[np.clip(k, 0, None)], 0.0)
        emp = np.searchsorted(np.sort(np.asarray(samples, dtype=np.float64)), x, side="right") / len(samples)
        return float(np.abs(emp - lat).sum() * (x[1] - x[0]))

    def stats(self, smoothed: bool = True) -> dict:
        import numpy as np

        x, p = self.density(smoothed)
        dx = x[1] - x[0]
        mean = float((x * p).sum() * dx)
        return {"right_mass": float(p[x > self.c].sum() * dx), "std": float(np.sqrt(((x - mean) ** 2 * p).sum() * dx))}


def run_chains(dw: DoubleWell, mode: dict, n: int, steps: int, lr: float, args):
    """FSGLD on one tensor of n chains; returns (final states as float64 numpy, masters or None, sec)."""
    import fused_flat

    x0 = torch.tensor(dw.c + dw.s * dw.y_min, dtype=BF16).float()   # right-hand minimum, on the bf16 lattice
    w = nn.Parameter(torch.full((n,), x0.item(), dtype=mode["dtype"]))
    opt = fused_flat.FSGLD([w], lr=lr, beta=dw.beta, eta=dw.eta, seed=args.seed + 1, backend=args.backend,
                           **mode["kw"])
    assert abs(opt.group_sigma(opt.param_groups[0]) - dw.sigma) < 1e-9 * dw.sigma

    def closure():
        w.grad = dw.grad(w.detach().float()).to(w.dtype)
        return torch.zeros(())

    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step(closure)
    sec = time.perf_counter() - t0
    master = opt.state[w].get("master_weight") if w in opt.state else None
    return (w.detach().double().numpy(), None if master is None else master.double().numpy(), sec)


def run_chains_sr_emulated(dw: DoubleWell, n: int, steps: int, args):
    """The fSGLD step of the default bf16 mode in plain torch, with emulated SR of the update:
    perturb to nearest (as the kernel), gradient there, exact restore, SR(theta - lr g + noise)."""
    gen = torch.Generator().manual_seed(args.seed + 2)
    x0 = torch.tensor(dw.c + dw.s * dw.y_min, dtype=BF16)
    w = torch.full((n,), x0.item(), dtype=BF16)
    std = math.sqrt(2 * dw.lr / dw.beta)
    t0 = time.perf_counter()
    for _ in range(steps):
        wp = (w.float() + dw.sigma * torch.randn(n, generator=gen)).to(BF16)
        g = dw.grad(wp.float()).to(BF16).float()
        w = sr_round_bf16(w.float() - dw.lr * g + std * torch.randn(n, generator=gen), gen)
    return w.double().numpy(), time.perf_counter() - t0


def part_double_well(args, out: Path) -> tuple[list[dict], dict, list[Path]]:
    import numpy as np

    dw = DoubleWell(args.dw_c, args.dw_s, args.dw_sigma_y, args.dw_barrier, args.dw_h)
    n, K = args.dw_chains, args.dw_steps
    rng = np.random.default_rng(args.seed)
    tgt = dw.stats()
    ulp = 2.0 ** -7
    info = {"c": dw.c, "s": dw.s, "sigma_y": dw.sy, "sigma": dw.sigma, "eta": dw.eta, "beta": dw.beta, "A": dw.A,
            "lr": dw.lr, "h": dw.h, "steps": K, "chains": n, "time_in_y_units": dw.h * K,
            "barrier_kT_smoothed": args.dw_barrier,
            "barrier_kT_unsmoothed": dw.beta * dw.A,
            "langevin_noise_per_step": math.sqrt(2 * dw.lr / dw.beta),
            "bf16_ulp": ulp, "noise_over_ulp": math.sqrt(2 * dw.lr / dw.beta) / ulp,
            "start": float(torch.tensor(dw.c + dw.s * dw.y_min, dtype=BF16)),
            "target_right_mass": tgt["right_mass"], "target_std": tgt["std"]}
    iid = dw.sample(n, rng)
    floors = {"sampling_floor_w1": dw.w1(iid),
              "bf16_lattice_floor_w1": dw.w1(torch.from_numpy(iid).to(BF16).double().numpy()),
              "bf16_lattice_sampling_floor_w1": dw.w1_lattice(torch.from_numpy(iid).to(BF16).double().numpy()),
              "unsmoothed_vs_smoothed_w1": dw.w1(dw.sample(200_000, rng, smoothed=False))}
    info.update(floors)

    rows, hists = [], {}

    def add(mode, label, measured_on, xs, sec, pending=False, lr=dw.lr, steps=K):
        r = {"mode": mode, "label": label, "measured_on": measured_on, "lr": lr, "steps": steps,
             "w1": dw.w1(xs), "w1_over_s": dw.w1(xs) / dw.s,
             "w1_vs_bf16_rounded_target": dw.w1_lattice(xs) if measured_on == "weights" and mode.startswith(
                 ("bf16", "SR")) else None,
             "w1_vs_unsmoothed_u": dw.w1(xs, smoothed=False),
             "right_mass": float((xs > dw.c).mean()), "std": float(xs.std()), "target_std": tgt["std"],
             "frac_at_start": float((xs == info["start"]).mean()), "pending_sr": pending, "sec": sec}
        rows.append(r)
        hists[f"{mode} ({measured_on})" if measured_on != "weights" else mode] = xs
        return r

    sr = sr_kernels(args.backend)
    for m in modes(args.backend):
        xs, master, sec = run_chains(dw, m, n, K, dw.lr, args)
        if master is not None:
            add(m["name"], m["label"], "fp32 master", master, sec)
        add(m["name"], m["label"], "weights", xs, sec, pending=(m["name"] == "bf16 default" and not sr))
        if m["name"] == "fp32" and not args.quick:
            xs2, _, sec2 = run_chains(dw, m, n, K // 2, 2 * dw.lr, args)
            add("fp32 2h", "fp32 at twice the lr, half the steps (discretisation bias)", "weights", xs2, sec2,
                lr=2 * dw.lr, steps=K // 2)
            hists.pop("fp32 2h")
    xs, sec = run_chains_sr_emulated(dw, n, K, args)
    add("SR emulated", "bf16 SR emulated in torch (not the library)", "weights", xs, sec)

    paths = []
    plt = common.plt()
    if plt is not None and not args.no_plot:
        x, p = dw.density()
        _, p0 = dw.density(smoothed=False)
        names = list(hists)
        cols = 3
        rws = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rws, cols, figsize=(5 * cols, 3.4 * rws), squeeze=False)
        lo, hi = dw.c - 2.2 * dw.s, dw.c + 2.2 * dw.s
        edges = np.arange(math.floor(lo / ulp) - 0.5, math.ceil(hi / ulp) + 0.5) * ulp   # one bin per bf16 value
        for ax, name in zip(axes.flat, names):
            ax.hist(hists[name], bins=edges, density=True, color="tab:blue", alpha=0.6, label="chains (final)")
            ax.plot(x, p, "k-", lw=1.2, label="exp(-β u_σ) (fSGLD target)")
            ax.plot(x, p0, "k:", lw=1, label="exp(-β u) (unsmoothed)")
            r = next(r for r in rows if (f"{r['mode']} ({r['measured_on']})" if r["measured_on"] != "weights"
                                         else r["mode"]) == name)
            tag = f" ({PENDING})" if r["pending_sr"] else " (not the library)" if r["mode"] == "SR emulated" else ""
            ax.set_title(f"{name}{tag}: W1 = {r['w1']:.2e}", fontsize=9)
            ax.set_xlim(lo, hi)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"double well, {n} chains x {K} FSGLD steps, β = {dw.beta:.3g}, σ = {dw.sigma:.3g}, "
                     f"lr = {dw.lr:.3g}; bins = bf16 values (ulp 2^-7)", fontsize=9)
        fig.tight_layout()
        paths.append(out / "double_well.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return rows, info, paths


# ----------------------------------------------------------------------------- 3. GPT
def markov_chain(vocab: int, gen: torch.Generator, fanout: int = 4):
    """A fixed random transition matrix: each token has ``fanout`` successors."""
    P = torch.zeros(vocab, vocab)
    for t in range(vocab):
        succ = torch.randperm(vocab, generator=gen)[:fanout]
        P[t, succ] = torch.rand(fanout, generator=gen) + 0.2
    P /= P.sum(1, keepdim=True)
    # entropy rate under the stationary law (power iteration)
    pi = torch.full((vocab,), 1.0 / vocab)
    for _ in range(500):
        pi = pi @ P
    H = -(pi[:, None] * P * torch.log(P.clamp_min(1e-30))).sum().item()
    return P, H


def markov_batch(P, batch: int, seq: int, gen: torch.Generator):
    vocab = P.shape[0]
    idx = torch.empty(batch, seq + 1, dtype=torch.long)
    idx[:, 0] = torch.randint(0, vocab, (batch,), generator=gen)
    for t in range(seq):
        idx[:, t + 1] = torch.multinomial(P[idx[:, t]], 1, generator=gen).squeeze(1)
    return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()


def part_gpt(args, out: Path) -> tuple[list[dict], list[dict], dict, list[Path]]:
    import fused_flat
    from benchmarks.e2e import GPTStack

    if args.quick:
        cfg = dict(vocab=64, d=32, layers=1, heads=2, seq=16)
        bs, steps, every = 4, 6, 3
    else:
        cfg = dict(vocab=args.gpt_vocab, d=args.gpt_d, layers=args.gpt_layers, heads=args.gpt_heads,
                   seq=args.gpt_seq)
        bs, steps, every = args.gpt_batch, args.gpt_steps, args.gpt_eval_every
    gen = torch.Generator().manual_seed(args.seed)
    P, H = markov_chain(cfg["vocab"], gen)
    batches = [markov_batch(P, bs, cfg["seq"], gen) for _ in range(steps)]
    held = markov_batch(P, 4 * bs, cfg["seq"], gen)
    torch.manual_seed(args.seed)
    base = GPTStack(**cfg)
    n_params = sum(p.numel() for p in base.parameters())
    hp = dict(lr=args.gpt_lr, beta=args.gpt_beta, weight_decay=args.gpt_wd)
    info = {"config": cfg, "batch": bs, "steps": steps, "eval_every": every, "n_params": n_params,
            "entropy_rate_nats": H, "log_vocab": math.log(cfg["vocab"]), **hp,
            "sigma": args.gpt_beta ** (-1.01 / 4), "langevin_noise_per_step": math.sqrt(2 * args.gpt_lr / args.gpt_beta)}

    def loss_of(model, batch):
        x, y = batch
        logits = model(x).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    curves, finals = [], []
    for m in modes(args.backend):
        model = GPTStack(**cfg)
        model.load_state_dict(base.state_dict())
        model.to(m["dtype"])
        model.train()
        opt = fused_flat.FSGLD(model.parameters(), seed=args.seed, backend=args.backend, **hp, **m["kw"])
        train = []
        t0 = time.perf_counter()
        for k, batch in enumerate(batches):
            def closure():
                opt.zero_grad()
                loss = loss_of(model, batch)
                loss.backward()
                return loss
            train.append(float(opt.step(closure).detach()))
            if (k + 1) % every == 0 or k == 0 or k == steps - 1:
                with torch.no_grad():
                    ev = float(loss_of(model, held))
                curves.append({"mode": m["name"], "step": k + 1, "train_loss": train[-1], "heldout_loss": ev})
            else:
                curves.append({"mode": m["name"], "step": k + 1, "train_loss": train[-1], "heldout_loss": None})
        sec = time.perf_counter() - t0
        last = train[-min(20, len(train)):]
        finals.append({"mode": m["name"], "label": m["label"], "steps": steps,
                       "final_train_loss_mean_last20": sum(last) / len(last),
                       "final_heldout_loss": curves[-1]["heldout_loss"], "initial_heldout_loss": next(
                           c["heldout_loss"] for c in curves if c["mode"] == m["name"]),
                       "entropy_rate": H, "sec_per_step": sec / steps,
                       "pending_sr": m["name"] == "bf16 default" and not sr_kernels(args.backend)})
    paths = []
    plt = common.plt()
    if plt is not None and not args.no_plot:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        styles = {"fp32": "-", "bf16 master": "--", "bf16 default": "-.", "bf16 nearest": ":"}
        for f in finals:
            cs = [c for c in curves if c["mode"] == f["mode"]]
            ls = styles.get(f["mode"], "-")
            axes[0].plot([c["step"] for c in cs], [c["train_loss"] for c in cs], ls=ls, lw=0.8, label=f["label"])
            ev = [c for c in cs if c["heldout_loss"] is not None]
            axes[1].plot([c["step"] for c in ev], [c["heldout_loss"] for c in ev], ls=ls, marker="o", ms=3,
                         label=f["label"])
        for ax, t in zip(axes, ("training loss (at the perturbed point)", "held-out loss")):
            ax.axhline(H, color="k", ls=":", lw=1, label="entropy rate (floor)")
            ax.set_xlabel("step")
            ax.set_ylabel("cross-entropy (nats)")
            ax.set_title(t, fontsize=9)
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7)
        fig.suptitle(f"GPT stack {cfg}, {n_params} params, FSGLD lr {hp['lr']} β {hp['beta']:g} "
                     f"wd {hp['weight_decay']}, batch {bs}, Markov tokens", fontsize=8)
        fig.tight_layout()
        paths.append(out / "gpt_loss.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return curves, finals, info, paths


# ----------------------------------------------------------------------------- 4. memory
MEM_MODES = [
    ("fp32 default", torch.float32, {}),
    ("fp32 exact_restore=True", torch.float32, dict(exact_restore=True)),
    ("bf16 default", BF16, {}),
    ("bf16 stochastic_rounding=False", BF16, dict(stochastic_rounding=False)),
    ("bf16 exact_restore=False", BF16, dict(exact_restore=False)),
    ("bf16 master_weights=True", BF16, dict(master_weights=True)),
]


def held_bytes(opt) -> int:
    """Bytes of every tensor in the optimizer's state and restore backups (unique storages)."""
    seen = {}
    tensors = [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    tensors += list(getattr(opt, "_backups", {}).values())
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def part_memory(args) -> list[dict]:
    import fused_flat

    rows = []
    for name, dtype, kw in MEM_MODES:
        r = {"mode": name}
        for mom in (0.0, 0.9):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8)).to(dtype)
            n = sum(p.numel() for p in model.parameters())
            opt = fused_flat.FSGLD(model.parameters(), lr=0.01, beta=1e8, momentum=mom, seed=0,
                                   backend=args.backend, **kw)
            x = torch.randn(16, 64).to(dtype)
            for _ in range(2):
                def closure():
                    opt.zero_grad()
                    loss = model(x).float().square().mean()
                    loss.backward()
                    return loss
                opt.step(closure)
            key = "bytes_per_param_momentum" if mom else "bytes_per_param_no_momentum"
            r[key] = held_bytes(opt) / n
            r["param_bytes"] = torch.empty((), dtype=dtype).element_size()
        r["transient_in_step"] = "fp32 copy of the gradients (4 B/param)" if kw.get("master_weights") else ""
        rows.append(r)
    return rows


# ----------------------------------------------------------------------------- main
WALK_COLS = [("label", "mode"), ("measured_on", "measured on"), ("ratio", "var / (2 lr K / β)"),
             ("ratio_se", "± s.e."), ("mean_over_sqrt_target", "mean / sqrt(target)"),
             ("frac_unmoved", "fraction never moved")]
DW_COLS = [("label", "mode"), ("measured_on", "measured on"), ("w1", "W1 to exp(-β u_σ)"),
           ("w1_over_s", "W1 / s"), ("w1_vs_bf16_rounded_target", "W1 to bf16-rounded target"),
           ("w1_vs_unsmoothed_u", "W1 to exp(-β u)"), ("right_mass", "right-well mass"),
           ("std", "std"), ("frac_at_start", "fraction at start value")]
GPT_COLS = [("label", "mode"), ("initial_heldout_loss", "held-out loss at step 1"),
            ("final_heldout_loss", "final held-out loss"), ("final_train_loss_mean_last20", "train loss, last 20"),
            ("sec_per_step", "s/step")]
MEM_COLS = [("mode", "mode"), ("param_bytes", "param B"), ("bytes_per_param_no_momentum", "held B/param, momentum 0"),
            ("bytes_per_param_momentum", "held B/param, momentum 0.9"), ("transient_in_step", "transient during step")]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="fused-flat bench lowprec", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (smoke test)")
    ap.add_argument("--parts", default="walk,dw,gpt,mem")
    ap.add_argument("--out", default=str(common.DEFAULT_OUT / "lowprec"))
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1: small tensors; the numbers do not depend on it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--walk-n", type=int, default=20000)
    ap.add_argument("--walk-steps", type=int, default=200)
    ap.add_argument("--dw-chains", type=int, default=20000)
    ap.add_argument("--dw-steps", type=int, default=10000)
    ap.add_argument("--dw-c", type=float, default=1.5, help="centre of the wells (x)")
    ap.add_argument("--dw-s", type=float, default=0.0625, help="half-distance of the wells of u (x)")
    ap.add_argument("--dw-sigma-y", type=float, default=0.4, help="sigma / s (sets beta through the coupling)")
    ap.add_argument("--dw-barrier", type=float, default=2.0, help="barrier of beta u_sigma, in kT")
    ap.add_argument("--dw-h", type=float, default=1e-3, help="step in the y-time: lr = h s^2 beta")
    ap.add_argument("--gpt-steps", type=int, default=300)
    ap.add_argument("--gpt-eval-every", type=int, default=25)
    ap.add_argument("--gpt-batch", type=int, default=16)
    ap.add_argument("--gpt-vocab", type=int, default=256)
    ap.add_argument("--gpt-d", type=int, default=128)
    ap.add_argument("--gpt-layers", type=int, default=2)
    ap.add_argument("--gpt-heads", type=int, default=4)
    ap.add_argument("--gpt-seq", type=int, default=32)
    ap.add_argument("--gpt-lr", type=float, default=0.1)
    ap.add_argument("--gpt-beta", type=float, default=1e8)
    ap.add_argument("--gpt-wd", type=float, default=5e-4)
    args = ap.parse_args(argv)
    if args.quick:
        args.walk_n, args.walk_steps = 2000, 50
        args.dw_chains, args.dw_steps = 2000, 200
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = common.machine_info(torch.device("cpu"))
    sr = sr_kernels(args.backend)
    print(common.meta_line(meta))
    cmd = "python -m fused_flat bench lowprec " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"meta": meta, "command": cmd.strip(), "quick": args.quick, "config": vars(args),
               "sr_kernels": sr, "parts": {}}
    if not sr:
        print(f"NOTE: the backend has no stochastic-rounding kernels in this build: the 'bf16 default' rows "
              f"round to nearest ({PENDING}).")
    md = ["# fused_flat: 16-bit parameters (bench lowprec)", "", common.meta_line(meta), "",
          f"Command: `{payload['command']}`", "",
          f"Stochastic-rounding kernels in this build: {'yes' if sr else 'NO (bf16 default rows: ' + PENDING + ')'}.",
          ""]
    paths = []
    t_all = time.perf_counter()
    # without SR kernels the optimizer's own warning is shown (once), as a user would see it
    if "walk" in parts:
        t0 = time.perf_counter()
        rows = part_walk(args)
        payload["parts"]["walk"] = {"rows": rows, "sec": time.perf_counter() - t0}
        common.write_csv(out / "walk.csv", rows, meta)
        paths.append(out / "walk.csv")
        md += [f"## 1. Paper regime: zero-gradient walk (β = 1e8, lr = 0.1, bf16 weights 0.05, "
               f"n = {args.walk_n}, K = {args.walk_steps})", "",
               common.markdown_table(rows, WALK_COLS), ""]
    if "dw" in parts:
        t0 = time.perf_counter()
        rows, info, ps = part_double_well(args, out)
        payload["parts"]["double_well"] = {"rows": rows, "info": info, "sec": time.perf_counter() - t0}
        common.write_csv(out / "double_well.csv", rows, meta)
        paths += [out / "double_well.csv", *ps]
        md += [f"## 2. Double well (closed-form fSGLD target), {info['chains']} chains x {info['steps']} steps",
               "",
               f"u(x) = A((x − c)²/s² − 1)², c = {info['c']}, s = {info['s']}, σ = {info['sigma']:.4g} "
               f"(σ/s = {info['sigma_y']}), β = {info['beta']:.4g}, A = {info['A']:.4g}, lr = {info['lr']:.4g}; "
               f"barrier of β u_σ {info['barrier_kT_smoothed']} kT (of β u {info['barrier_kT_unsmoothed']:.2f} kT); "
               f"Langevin noise per step {info['langevin_noise_per_step']:.3g} = "
               f"{info['noise_over_ulp']:.2f} bf16 ulp; all chains start at {info['start']:.6g} (right well); "
               f"target right-well mass {info['target_right_mass']:.3f}, std {info['target_std']:.4g}.", "",
               f"Floors: W1 of {info['chains']} exact iid draws {info['sampling_floor_w1']:.2e} (sampling); "
               f"the same draws rounded to bf16 {info['bf16_lattice_floor_w1']:.2e} (bf16 lattice; their W1 to the "
               f"bf16-rounded target, {info['bf16_lattice_sampling_floor_w1']:.2e}, is the sampling floor of "
               f"that column); "
               f"W1 between exp(−β u) and exp(−β u_σ) {info['unsmoothed_vs_smoothed_w1']:.2e}.", "",
               common.markdown_table(rows, DW_COLS), ""]
    if "gpt" in parts:
        t0 = time.perf_counter()
        curves, finals, info, ps = part_gpt(args, out)
        payload["parts"]["gpt"] = {"curves": curves, "final": finals, "info": info, "sec": time.perf_counter() - t0}
        common.write_csv(out / "gpt_curves.csv", curves, meta)
        common.write_csv(out / "gpt_final.csv", finals, meta)
        paths += [out / "gpt_curves.csv", out / "gpt_final.csv", *ps]
        md += [f"## 3. GPT stack in bf16, FSGLD ({info['n_params']} parameters, {info['steps']} steps)", "",
               f"{info['config']}, batch {info['batch']}, lr {info['lr']}, β {info['beta']:g}, weight decay "
               f"{info['weight_decay']}; Markov tokens, entropy rate {info['entropy_rate_nats']:.3f} nats "
               f"(log vocab {info['log_vocab']:.3f}).", "",
               common.markdown_table(finals, GPT_COLS), ""]
    if "mem" in parts:
        rows = part_memory(args)
        payload["parts"]["memory"] = {"rows": rows}
        common.write_csv(out / "memory.csv", rows, meta)
        paths.append(out / "memory.csv")
        md += ["## 4. Bytes per parameter held by the optimizer (state + restore backups)", "",
               common.markdown_table(rows, MEM_COLS), ""]
    payload["total_sec"] = time.perf_counter() - t_all
    md += [f"Total {payload['total_sec']:.0f} s.", ""]
    common.write_json(out / "lowprec.json", payload)
    (out / "lowprec.md").write_text("\n".join(md))
    paths = [out / "lowprec.json", out / "lowprec.md", *paths]
    print("\n".join(md))
    common.announce(paths)
    return payload


if __name__ == "__main__":
    main()
