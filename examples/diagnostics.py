"""Flatness and Bayesian diagnostics after training: Hessian trace and lambda_max of the
final iterate, and the Bayesian model average over FSGLD snapshots with its calibration and
OOD scores.

    python examples/diagnostics.py            # digits, 15 epochs FSGLD, 100 Hutchinson probes
    python examples/diagnostics.py --smoke    # seconds: 2 epochs, 5 probes

Data and model are benchmarks/science.py's (scikit-learn's digits, the small CNN; OOD set:
the test images with their pixels permuted). The evaluation loader is a list of batches in a
fixed order, as SnapshotAverager requires (a shuffling DataLoader is refused).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fused_flat  # noqa: E402
from fused_flat import diagnostics as D  # noqa: E402


def main(argv=None) -> dict:
    from benchmarks.science import load_data, make_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--beta", type=float, default=1e5)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--probes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="2 epochs of 5 steps, 5 probes")
    args = ap.parse_args(argv)
    max_steps = 5 if args.smoke else None
    if args.smoke:
        args.epochs, args.probes = 2, 5
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    x_tr, y_tr, _, x_te, y_te, x_ood = load_data(args.seed, 0.0)
    model = make_model()
    opt = fused_flat.FSGLD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4,
                           beta=args.beta, seed=args.seed)
    test_batches = [(x_te[i:i + 128], y_te[i:i + 128]) for i in range(0, len(x_te), 128)]
    bma = D.SnapshotAverager(model, test_batches, burn_in=args.epochs // 2)
    ood = D.SnapshotAverager(model, x_ood, burn_in=args.epochs // 2)
    g = torch.Generator().manual_seed(args.seed)
    for _ in range(args.epochs):
        perm = torch.randperm(len(x_tr), generator=g)
        for k, i in enumerate(range(0, len(x_tr), 32)):
            if max_steps is not None and k >= max_steps:
                break
            idx = perm[i:i + 32]

            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
                loss.backward()
                return loss

            opt.step(closure)
        bma.step()
        ood.step()

    train_data = [(x_tr[:256], y_tr[:256])]
    tr = D.hessian_trace(model, F.cross_entropy, train_data, n_probes=args.probes, seed=0)
    lam = D.hessian_lambda_max(model, F.cross_entropy, train_data, iters=20 if args.smoke else 100)
    metrics = D.classification_metrics(bma.probs(), y_te)
    o = D.ood_metrics(bma.probs(), ood.probs())
    print(f"Hessian trace (train, 256 samples): {tr.estimate:.2f} +- {tr.stderr:.2f}")
    print(f"lambda_max: {lam:.3f}")
    print(f"BMA over {bma.n_snapshots} snapshots: accuracy {metrics['accuracy']:.3f}, "
          f"NLL {metrics['nll']:.3f}, ECE {metrics['ece']:.3f}; OOD AUROC {o['auroc']:.3f}")
    return {"trace": tr.estimate, "lambda_max": lam, **metrics, **o}


if __name__ == "__main__":
    main()
