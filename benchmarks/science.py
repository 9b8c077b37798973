"""Does fSGLD find flatter minima? A small-scale reproduction of the fSGLD paper's claims.

Usage: python -m fused_flat science [--quick] [--seeds 5] [--epochs 30] [--workers 2] [--out DIR]

Data: scikit-learn's digits (1797 8x8 grey images, 10 classes; ships with scikit-learn, no
download), split 70/30 train/test, stratified, by the run's seed. Pixels are scaled to
[0, 1] and standardised with the training mean/std. Symmetric label noise on the training
split only: exactly round(p * n_train) training samples, chosen at random, get a label drawn
uniformly from the 9 *other* classes (p = 0, 0.2, 0.4). The test labels are clean.

OOD set ("permuted digits"): the test images with each image's 64 pixels shuffled by its own
random permutation (seeded): the same pixel-intensity histogram as a digit, no spatial
structure. OOD detection scores every test and OOD image by the entropy of the BMA
predictive; AUROC/AUPR with OOD as the positive class.

Model: conv 3x3 1->16, ReLU, maxpool 2, conv 3x3 16->32, ReLU, maxpool 2, linear 128->10
(6,090 parameters, no BatchNorm). Batch 32, every optimizer at the same epochs, lr, momentum
and weight decay (lr 0.02, momentum 0.9, weight decay 5e-4, constant lr).

Optimizers: SGD (torch.optim.SGD); SGLD (fused_flat.SGLD, beta); FSGLD with the coupled
sigma = beta^(-(1+eta)/4); FSGLD with sigma decoupled at 0.5x and 2x the coupled value (the
paper's sec. 4.4 ablation, same beta); RWP at the coupled sigma (fSGLD without the Langevin
noise); SAM (rho 0.05, SGD base). Default beta = 1e5, eta = 0.01: sigma = 0.0546 and Langevin
noise sqrt(2 lr / beta) = 6.3e-4 per step. beta was picked by a one-seed pilot (seed 100, not
among the reported seeds 0-4; 20% noise; beta in {1e4, 1e5, 1e6, 1e8}; criterion: FSGLD's test
accuracy on seed 100's split, whose test images overlap those of seeds 0-4). The paper's beta in [1e7, 1e9] is for 50k CIFAR images; at
beta 1e8, sigma = 0.0095 barely changes this 6k-parameter CNN's solution (see --beta).

Measured per run: final-iterate test accuracy, NLL, ECE (15 bins), Brier; BMA over one
snapshot per epoch in the second half of training (accuracy, NLL, ECE, OOD AUROC/AUPR);
the training loss's (noisy labels, eval mode, no weight decay; on 512 of the ~1257 training
samples, a fixed random subset since the split is shuffled, --hessian-samples) Hessian at the final
iterate: Hutchinson trace (Rademacher probes, with standard error) and the top eigenvalues
by scipy eigsh (tol 1e-3, maxiter 500); wall-clock of the training steps per epoch.

Outputs in --out (default results/science/): science.json (every run, the summary, the
configuration and the machine), science_runs.csv, science_summary.csv, science.md (the
markdown table), accuracy_vs_noise.png, flatness.png.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    from benchmarks import common
except ImportError:  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import common

OPTIMIZERS = ("SGD", "SGLD", "FSGLD", "FSGLD-sigma-x0.5", "FSGLD-sigma-x2", "RWP", "SAM")
NOISE_LEVELS = (0.0, 0.2, 0.4)


# ----------------------------------------------------------------------------- data
def load_data(seed: int, noise: float):
    """Train/test/OOD tensors for one seed: (x_tr, y_tr_noisy, y_tr_clean, x_te, y_te, x_ood)."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype("float32") / 16.0
    y = d.target.astype("int64")
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    rng = np.random.default_rng(seed + 10_000)
    y_noisy = y_tr.copy()
    n_flip = int(round(noise * len(y_tr)))
    idx = rng.choice(len(y_tr), size=n_flip, replace=False)
    y_noisy[idx] = (y_tr[idx] + rng.integers(1, 10, size=n_flip)) % 10    # a different class, uniform
    flat = x_te.reshape(len(x_te), -1)
    x_ood = np.stack([row[rng.permutation(64)] for row in flat]).reshape(x_te.shape)

    def t(a):
        return ((torch.from_numpy(np.ascontiguousarray(a)) - mean) / std).unsqueeze(1)

    return (t(x_tr), torch.from_numpy(y_noisy), torch.from_numpy(y_tr), t(x_te), torch.from_numpy(y_te),
            t(x_ood))


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 10))


def coupled_sigma(beta: float, eta: float) -> float:
    return beta ** (-(1 + eta) / 4)


# ----------------------------------------------------------------------------- one run
def build_step(name: str, model: nn.Module, cfg: dict, seed: int):
    """(optimizer, step(x, y) -> loss) for one optimizer name."""
    import fused_flat

    params = list(model.parameters())
    hp = dict(lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    beta, eta = cfg["beta"], cfg["eta"]
    sig = coupled_sigma(beta, eta)

    def plain(opt):
        def step(x, y):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            return loss
        return opt, step

    def closure_form(opt):
        def step(x, y):
            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
            return opt.step(closure)
        return opt, step

    if name == "SGD":
        return plain(torch.optim.SGD(params, **hp))
    if name == "SGLD":
        return plain(fused_flat.SGLD(params, beta=beta, seed=seed, **hp))
    if name == "FSGLD":
        return closure_form(fused_flat.FSGLD(params, beta=beta, eta=eta, seed=seed, **hp))
    if name.startswith("FSGLD-sigma-x"):
        factor = float(name.rsplit("x", 1)[1])
        return closure_form(fused_flat.FSGLD(params, beta=beta, eta=eta, sigma=factor * sig, seed=seed, **hp))
    if name == "RWP":
        return closure_form(fused_flat.RWP(params, sigma=sig, seed=seed, **hp))
    if name == "SAM":
        opt = fused_flat.SAM(params, torch.optim.SGD, rho=cfg["rho"], **hp)

        def step(x, y):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step(lambda: F.cross_entropy(model(x), y).backward())
            return loss.detach()
        return opt, step
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")


def run_one(name: str, noise: float, seed: int, cfg: dict) -> dict:
    """Train one (optimizer, label noise, seed) and measure everything."""
    from fused_flat import diagnostics as D

    torch.set_num_threads(cfg["threads"])
    x_tr, y_tr, y_clean, x_te, y_te, x_ood = load_data(seed, noise)
    torch.manual_seed(seed)
    model = make_model()                     # same init for every optimizer at a given seed
    opt, step = build_step(name, model, cfg, seed)
    gen = torch.Generator().manual_seed(seed)
    n, bs, epochs = len(y_tr), cfg["batch_size"], cfg["epochs"]
    steps_per_epoch = n // bs if cfg["max_steps"] is None else min(n // bs, cfg["max_steps"])
    burn_in = epochs // 2
    bma = D.SnapshotAverager(model, torch.cat([x_te, x_ood]), burn_in=burn_in, every=1)
    epoch_times, losses = [], []
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        t0 = time.perf_counter()
        total = 0.0
        for i in range(steps_per_epoch):
            b = perm[i * bs:(i + 1) * bs]
            total += float(step(x_tr[b], y_tr[b]).detach())
        epoch_times.append(time.perf_counter() - t0)
        losses.append(total / steps_per_epoch)
        bma.step()                           # snapshots: one per epoch after burn-in
    n_te = len(y_te)
    final = D.predict_proba(model, torch.cat([x_te, x_ood]))
    p_final, p_final_ood = final[:n_te], final[n_te:]
    p_bma = bma.probs()
    p_bma_in, p_bma_ood = p_bma[:n_te], p_bma[n_te:]
    row = {"optimizer": name, "label_noise": noise, "seed": seed, "epochs": epochs,
           "steps_per_epoch": steps_per_epoch, "final_train_loss": losses[-1],
           "train_acc_noisy": D.accuracy(D.predict_proba(model, x_tr), y_tr),
           "train_acc_clean_labels": D.accuracy(D.predict_proba(model, x_tr), y_clean),
           "bma_snapshots": bma.n_snapshots,
           "sec_per_epoch": sum(epoch_times) / len(epoch_times),
           "sec_per_epoch_median": sorted(epoch_times)[len(epoch_times) // 2]}
    for k, v in D.classification_metrics(p_final, y_te).items():
        row[f"test_{k}"] = v
    for k, v in D.classification_metrics(p_bma_in, y_te).items():
        row[f"bma_{k}"] = v
    for k, v in D.ood_metrics(p_final, p_final_ood).items():
        row[f"ood_{k}_final"] = v
    for k, v in D.ood_metrics(p_bma_in, p_bma_ood).items():
        row[f"ood_{k}_bma"] = v
    # curvature of the training objective at the final iterate (noisy labels, no weight decay)
    t0 = time.perf_counter()
    m = len(y_tr) if cfg.get("hessian_samples") is None else cfg["hessian_samples"]
    op = D.HessianOperator(model, F.cross_entropy, (x_tr[:m], y_tr[:m]), cache_graph=True)
    tr = D.hessian_trace(op, n_probes=cfg["trace_probes"], seed=seed)
    eig = D.hessian_eigenvalues(op, k=cfg["top_k"], tol=cfg["eig_tol"], maxiter=cfg["eig_maxiter"], seed=seed)
    row.update({"hessian_trace": tr.estimate, "hessian_trace_se": tr.stderr, "lambda_max": float(eig[0]),
                "top_eigenvalues": [float(e) for e in eig], "hessian_products": op.n_products,
                "hessian_sec": time.perf_counter() - t0, "n_params": op.dim})
    return row


# ----------------------------------------------------------------------------- summary
METRICS = [("test_accuracy", "acc"), ("test_nll", "NLL"), ("test_ece", "ECE"), ("bma_accuracy", "BMA acc"),
           ("bma_nll", "BMA NLL"), ("bma_ece", "BMA ECE"), ("ood_auroc_bma", "OOD AUROC"),
           ("hessian_trace", "tr H"), ("lambda_max", "λ_max"), ("sec_per_epoch", "s/epoch")]


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, s


def summarize(rows: list[dict], optimizers, noises) -> list[dict]:
    out = []
    for noise in noises:
        for name in optimizers:
            rs = [r for r in rows if r["optimizer"] == name and r["label_noise"] == noise]
            if not rs:
                continue
            s = {"optimizer": name, "label_noise": noise, "n_seeds": len(rs)}
            for key, _ in METRICS + [("train_acc_noisy", ""), ("ood_aupr_bma", ""), ("ood_auroc_final", ""),
                                     ("test_brier", ""), ("bma_brier", "")]:
                m, sd = _mean_std([r[key] for r in rs])
                s[f"{key}_mean"], s[f"{key}_std"] = m, sd
            out.append(s)
    return out


def _pm(m: float, s: float, key: str) -> str:
    if key in ("test_accuracy", "bma_accuracy", "ood_auroc_bma"):
        m, s, f = 100 * m, 100 * s, "{:.1f}"
    elif key in ("hessian_trace",):
        f = "{:.1f}"
    elif key in ("lambda_max",):
        f = "{:.2f}"
    elif key == "sec_per_epoch":
        f = "{:.3f}"
    else:
        f = "{:.3f}"
    return f.format(m) + ("" if math.isnan(s) else " ± " + f.format(s))


def markdown(summary: list[dict]) -> str:
    head = "| noise | optimizer | " + " | ".join(h for _, h in METRICS) + " |"
    sep = "|" + "---|" * (len(METRICS) + 2)
    lines = [head, sep]
    for s in summary:
        cells = [_pm(s[f"{k}_mean"], s[f"{k}_std"], k) for k, _ in METRICS]
        lines.append(f"| {int(100 * s['label_noise'])}% | {s['optimizer']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plots(summary: list[dict], out: Path, optimizers, noises) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "test_accuracy", "final iterate"), (axes[1], "bma_accuracy", "BMA")):
        for name in optimizers:
            ss = [s for s in summary if s["optimizer"] == name]
            if not ss:
                continue
            ax.errorbar([100 * s["label_noise"] for s in ss], [100 * s[f"{key}_mean"] for s in ss],
                        yerr=[0 if math.isnan(s[f"{key}_std"]) else 100 * s[f"{key}_std"] for s in ss],
                        marker="o", capsize=3, label=name)
        ax.set_xlabel("symmetric label noise on the training split (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"digits, small CNN: {title}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_noise.png", dpi=120)
    plt.close(fig)
    files.append("accuracy_vs_noise.png")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / max(1, len(noises))
    for ax, key, label in ((axes[0], "hessian_trace", "Hessian trace (Hutchinson)"),
                           (axes[1], "lambda_max", "λ_max (eigsh)")):
        for j, noise in enumerate(noises):
            xs, ms, es = [], [], []
            for i, name in enumerate(optimizers):
                s = next((s for s in summary if s["optimizer"] == name and s["label_noise"] == noise), None)
                if s is None:
                    continue
                xs.append(i + (j - (len(noises) - 1) / 2) * width)
                ms.append(s[f"{key}_mean"])
                es.append(0 if math.isnan(s[f"{key}_std"]) else s[f"{key}_std"])
            ax.bar(xs, ms, width=width, yerr=es, capsize=2, label=f"noise {int(100 * noise)}%")
        ax.set_xticks(range(len(optimizers)))
        ax.set_xticklabels(optimizers, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.set_title(f"{label} at the end of training (mean ± std over seeds)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "flatness.png", dpi=120)
    plt.close(fig)
    files.append("flatness.png")
    return files


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="fused-flat science", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 2 epochs of 5 steps, Hessian on 128 samples with 4 probes")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed + seeds - 1")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--noise", default=",".join(str(p) for p in NOISE_LEVELS), help="label-noise fractions")
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--beta", type=float, default=1e5, help="inverse temperature of SGLD / FSGLD")
    ap.add_argument("--eta", type=float, default=0.01)
    ap.add_argument("--rho", type=float, default=0.05, help="SAM radius")
    ap.add_argument("--trace-probes", type=int, default=30)
    ap.add_argument("--top-k", type=int, default=5, help="top Hessian eigenvalues by eigsh")
    ap.add_argument("--hessian-samples", type=int, default=512,
                    help="the Hessian is of the loss on the first N training samples (0: all)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                    help="processes (one torch thread each)")
    ap.add_argument("--out", default=str(common.DEFAULT_OUT / "science"))
    args = ap.parse_args(argv)
    optimizers = [o for o in args.optimizers.split(",") if o]
    for o in optimizers:
        if o not in OPTIMIZERS:
            ap.error(f"unknown optimizer {o!r}; choose from {','.join(OPTIMIZERS)}")
    noises = [float(p) for p in args.noise.split(",")]
    cfg = dict(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, batch_size=args.batch_size,
               beta=args.beta, eta=args.eta, rho=args.rho, epochs=args.epochs, max_steps=None,
               trace_probes=args.trace_probes, top_k=args.top_k, eig_tol=1e-3, eig_maxiter=500, threads=1,
               hessian_samples=args.hessian_samples or None)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    workers = args.workers
    if args.quick:
        seeds, workers = [0], 1
        cfg.update(epochs=2, max_steps=5, trace_probes=4, top_k=2, eig_tol=1e-2, eig_maxiter=100,
                   hessian_samples=128)
    cfg["coupled_sigma"] = coupled_sigma(cfg["beta"], cfg["eta"])
    cfg["langevin_noise_per_step"] = math.sqrt(2 * cfg["lr"] / cfg["beta"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [(o, p, s) for s in seeds for p in noises for o in optimizers]
    meta = common.machine_info(torch.device("cpu"))
    meta["torch_threads"] = cfg["threads"]
    meta["workers"] = workers
    t_start = time.perf_counter()
    rows = []
    bar = common.progress(range(len(tasks)), desc="science runs", total=len(tasks))
    it = iter(bar)
    if workers <= 1:
        threads = torch.get_num_threads()
        try:
            for task in tasks:
                rows.append(run_one(*task, cfg))
                next(it, None)
        finally:
            torch.set_num_threads(threads)
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
            futs = [ex.submit(run_one, *task, cfg) for task in tasks]
            for f in as_completed(futs):
                rows.append(f.result())
                next(it, None)
    if hasattr(bar, "close"):
        bar.close()
    total_sec = time.perf_counter() - t_start
    order = {(o, p, s): i for i, (o, p, s) in enumerate(tasks)}
    rows.sort(key=lambda r: order[(r["optimizer"], r["label_noise"], r["seed"])])
    summary = summarize(rows, optimizers, noises)
    table = markdown(summary)
    payload = {"config": cfg, "optimizers": optimizers, "label_noise": noises, "seeds": seeds,
               "quick": args.quick, "total_sec": total_sec, "meta": meta, "summary": summary, "runs": rows,
               "ood_set": "digits test images, each image's 64 pixels shuffled by its own random permutation",
               "command": "python -m fused_flat science " + " ".join(argv if argv is not None else sys.argv[2:])}
    common.write_json(out / "science.json", payload)
    common.write_csv(out / "science_runs.csv", [{k: v for k, v in r.items() if k != "top_eigenvalues"} for r in rows],
                     meta)
    common.write_csv(out / "science_summary.csv", summary, meta)
    header = (f"digits (sklearn), small CNN ({rows[0]['n_params']} parameters), {len(seeds)} seed(s), "
              f"{cfg['epochs']} epochs, beta {cfg['beta']:g}, coupled sigma {cfg['coupled_sigma']:.4f}, "
              f"total {total_sec:.0f} s with {workers} worker(s)\n\n{common.meta_line(meta)}\n\n")
    (out / "science.md").write_text(header + table + "\n")
    files = plots(summary, out, optimizers, noises)
    print(header + table)
    print(f"\nwrote {out}/science.json, science_runs.csv, science_summary.csv, science.md, " + ", ".join(files))
    return payload


if __name__ == "__main__":
    main()
