"""A CIFAR-style training loop on synthetic data: FSGLD, SGD and SAM side by side.

    python examples/cifar_synthetic.py            # 60 steps each, a few seconds per optimizer on CPU
    python examples/cifar_synthetic.py --smoke    # 3 steps each

Synthetic 3x32x32 images whose class is a fixed random linear function of the mean colour
of each image quadrant (so there is something to learn, and nothing to download), a small CNN, and the three loops a
user writes: torch.optim.SGD, fused_flat.FSGLD with a closure (perturb -> closure -> restore
+ update, one gradient per step), fused_flat.SAM with a closure (two gradients per step).
Each optimizer starts from the same initialization and sees the same batches; the script
prints the final training loss, the held-out accuracy and the seconds per step.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import fused_flat  # noqa: E402


def make_data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    x = x + torch.randn(n, 3, 2, 2, generator=g).repeat_interleave(16, 2).repeat_interleave(16, 3)
    w = torch.randn(10, 12, generator=torch.Generator().manual_seed(1234))
    y = (F.avg_pool2d(x, 16).flatten(1) @ w.T).argmax(1)
    return x, y


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 10))


def make_optimizer(name: str, params, lr: float):
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    if name == "FSGLD":
        return fused_flat.FSGLD(params, lr=lr, momentum=0.9, weight_decay=5e-4, beta=1e8, seed=0)
    if name == "SAM":
        return fused_flat.SAM(params, torch.optim.SGD, rho=0.05, lr=lr, momentum=0.9,
                              weight_decay=5e-4, seed=0)
    raise ValueError(name)


def train(name: str, args, data) -> dict:
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(args.seed)
    model = make_model()
    opt = make_optimizer(name, model.parameters(), args.lr)
    loss = torch.tensor(float("nan"))
    t0 = time.perf_counter()
    for step in range(args.steps):
        i = (step * args.batch_size) % (x_tr.shape[0] - args.batch_size + 1)
        xb, yb = x_tr[i:i + args.batch_size], y_tr[i:i + args.batch_size]

        def closure():
            opt.zero_grad()
            out = F.cross_entropy(model(xb), yb)
            out.backward()
            return out

        if name == "SGD":
            loss = closure()
            opt.step()
        else:
            loss = opt.step(closure)   # FSGLD: one gradient per step; SAM: two
    seconds = (time.perf_counter() - t0) / args.steps
    model.eval()
    with torch.no_grad():
        acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    return {"loss": float(loss.detach()), "accuracy": acc, "s_per_step": seconds}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="3 steps per optimizer, small data")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.batch_size = 3, 16
    torch.set_num_threads(args.threads)
    n_train = max(4 * args.batch_size, 512 if not args.smoke else 64)
    x_tr, y_tr = make_data(n_train, args.seed)
    x_te, y_te = make_data(256 if not args.smoke else 64, args.seed + 1)
    results = {}
    for name in ("SGD", "FSGLD", "SAM"):
        r = train(name, args, (x_tr, y_tr, x_te, y_te))
        results[name] = r
        print(f"{name:6s} loss {r['loss']:.3f}  held-out accuracy {r['accuracy']:.3f}  "
              f"{1e3 * r['s_per_step']:.1f} ms/step")
    return {f"{n}_{k}": v for n, r in results.items() for k, v in r.items()}


if __name__ == "__main__":
    main()
