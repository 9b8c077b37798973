"""Posterior sampling with N parallel chains on scikit-learn's digits: BMA over chains vs one chain.

    python examples/chains.py                  # 4 chains, SGLD, 30 epochs (about a minute on CPU)
    python examples/chains.py --smoke          # seconds: 2 chains, 8 short epochs
    python examples/chains.py --sampler fsgld --chains 8 --out results/chains.json

Data and model are benchmarks/science.py's (digits 70/30 split by --seed, standardised; the
small CNN, 6,090 parameters per chain; optional symmetric label noise on the training split).
The N chains are one fused_flat.chains.Chains module: different initialisations (seeds
seed*1000 + c), and each chain draws its own mini-batches (per-chain inputs ``[N, batch, ...]``),
so the chains are independent; one SGLD/FSGLD optimizer updates all of them, chain c's noise
being the elements c*numel_t + e of each stacked tensor.

Snapshots: every --snapshot-every steps after burn-in (the first half of the steps). Reported:
- each chain alone: the BMA over its own snapshots (accuracy, NLL, ECE on the test split);
- all chains: the BMA over every chain and snapshot;
- split-R-hat (BDA3; and rank-normalized, Vehtari et al. 2021) of the per-chain test NLL traces;
- per-chain Hessian trace (Hutchinson) of the training loss at the final iterate.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fused_flat  # noqa: E402
from fused_flat import chains as C  # noqa: E402
from fused_flat import diagnostics as D  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--sampler", choices=("sgld", "fsgld"), default="sgld")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--beta", type=float, default=1e5, help="inverse temperature (science.py's default)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--label-noise", type=float, default=0.0)
    ap.add_argument("--snapshot-every", type=int, default=10, help="steps between snapshots after burn-in")
    ap.add_argument("--trace-probes", type=int, default=20, help="Hutchinson probes per chain (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true", help="2 chains, 8 epochs of 3 steps, 2 probes")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.chains, args.epochs, args.snapshot_every, args.trace_probes = 2, 8, 3, 2
        args.max_steps = 3
    else:
        args.max_steps = None
    if args.chains < 1:
        ap.error("--chains must be >= 1")
    return args


def main(argv=None) -> dict:
    from benchmarks.science import load_data, make_model

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    x_tr, y_tr, _, x_te, y_te, _ = load_data(args.seed, args.label_noise)
    n = args.chains
    chains = C.Chains.from_model(make_model, n, seeds=[args.seed * 1000 + c for c in range(n)])
    hp = dict(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, beta=args.beta,
              seed=args.seed)
    opt = (fused_flat.SGLD if args.sampler == "sgld" else fused_flat.FSGLD)(chains.parameters(), **hp)
    bs = args.batch_size
    steps_per_epoch = len(y_tr) // bs if args.max_steps is None else args.max_steps
    total_steps = steps_per_epoch * args.epochs
    burn_in = total_steps // 2
    avg = C.ChainAverager(chains, (x_te, y_te), metrics=("accuracy", "nll"))
    gens = [torch.Generator().manual_seed(args.seed * 1000 + c) for c in range(n)]
    t0 = time.perf_counter()
    step = 0
    for _ in range(args.epochs):
        perms = [torch.randperm(len(y_tr), generator=g) for g in gens]   # each chain its own order
        chains.train()
        for i in range(steps_per_epoch):
            idx = torch.stack([p[i * bs:(i + 1) * bs] for p in perms])   # [N, batch]
            x, y = x_tr[idx], y_tr[idx]

            def closure():
                opt.zero_grad()
                loss = C.chain_loss(chains(x, per_chain=True), y, F.cross_entropy, per_chain_target=True)
                loss.backward()
                return loss

            opt.step(closure)
            step += 1
            if step > burn_in and (step - burn_in) % args.snapshot_every == 0:
                avg.collect()
    train_sec = time.perf_counter() - t0

    chain_bma = avg.chain_probs()                        # [N, M, C]: each chain's own snapshot BMA
    per = C.per_chain_metrics(chain_bma, y_te, ("accuracy", "nll", "ece"))
    all_bma = D.classification_metrics(avg.probs(), y_te)
    final = C.per_chain_metrics(C.chain_predict_proba(chains, x_te), y_te, ("accuracy", "nll"))
    trace = avg.trace("nll")
    rhat = C.split_rhat(trace) if trace.shape[1] >= 4 else math.nan
    rhat_rank = C.split_rhat(trace, rank_normalize=True) if trace.shape[1] >= 4 else math.nan
    tr_h = []
    if args.trace_probes >= 2:
        m = 256
        tr_h = [t.estimate for t in C.per_chain_hessian_trace(
            chains, F.cross_entropy, (x_tr[:m], y_tr[:m]), n_probes=args.trace_probes, seed=args.seed,
            cache_graph=True)]

    def mean_sd(v):
        mu = sum(v) / len(v)
        sd = math.sqrt(sum((a - mu) ** 2 for a in v) / (len(v) - 1)) if len(v) > 1 else float("nan")
        return mu, sd

    result = {"config": {k: v for k, v in vars(args).items()}, "n_snapshots": avg.n_snapshots,
              "train_sec": train_sec, "single_chain_bma": per, "all_chains_bma": all_bma,
              "final_iterate": final, "rhat_nll": rhat, "rhat_nll_rank": rhat_rank,
              "hessian_trace_per_chain": tr_h}
    print(f"digits, {n} chains x {chains.numel_per_chain()} parameters, {args.sampler.upper()} "
          f"beta={args.beta:g} lr={args.lr:g}, {total_steps} steps ({train_sec:.1f} s), "
          f"{avg.n_snapshots} snapshots per chain after {burn_in} burn-in steps")
    print(f"{'':28s} {'accuracy':>9s} {'NLL':>8s} {'ECE':>7s}")
    for c in range(n):
        print(f"chain {c} alone (BMA)          {100 * per['accuracy'][c]:8.2f}% {per['nll'][c]:8.4f} "
              f"{per['ece'][c]:7.4f}")
    ma, sa = mean_sd(per["accuracy"])
    mn, sn = mean_sd(per["nll"])
    print(f"one chain, mean +- sd         {100 * ma:6.2f}+-{100 * sa:.2f}% {mn:.4f}+-{sn:.4f}")
    print(f"BMA over {n} chains            {100 * all_bma['accuracy']:8.2f}% {all_bma['nll']:8.4f} "
          f"{all_bma['ece']:7.4f}")
    print(f"split-R-hat of the per-chain test NLL traces: {rhat:.3f} (rank-normalized {rhat_rank:.3f})")
    if tr_h:
        print("Hessian trace per chain (train loss, 256 samples): " + ", ".join(f"{t:.1f}" for t in tr_h))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
