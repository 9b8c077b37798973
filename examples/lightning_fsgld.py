"""fSGLD under Lightning, with gradient accumulation: FusedFlatCallback.

    python examples/lightning_fsgld.py --smoke          # a few seconds on CPU
    python examples/lightning_fsgld.py --epochs 20 --accumulate 4
    python examples/lightning_fsgld.py --optimizer sam  # SAM (accumulation 1: no callback needed)

A small MLP on a synthetic classification task (Gaussian blobs), trained with
``fused_flat.FSGLD`` through Lightning's automatic optimization. With
``accumulate_grad_batches > 1`` the callback is what makes the run correct: every
micro-batch of an optimizer step is computed at the same perturbed point, and validation
runs on the unperturbed weights (without it Lightning computes the first micro-batches at
the unperturbed weights and only the last at the perturbed point, silently). Needs
``pip install lightning`` (or ``pytorch-lightning``).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

try:
    import fused_flat
except ImportError:   # run from a source checkout that is not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fused_flat

try:
    import lightning.pytorch as L
except ImportError:
    try:
        import pytorch_lightning as L
    except ImportError:
        sys.exit("this example needs Lightning: pip install lightning")

from fused_flat.integrations.lightning import FusedFlatCallback


def blobs(n_train: int, n_val: int, classes: int, dim: int, seed: int):
    """Train and validation sets drawn from the same Gaussian blobs (one per class)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 1.5
    y = torch.randint(0, classes, (n_train + n_val,), generator=g)
    x = centers[y] + torch.randn(n_train + n_val, dim, generator=g)
    return (torch.utils.data.TensorDataset(x[:n_train], y[:n_train]),
            torch.utils.data.TensorDataset(x[n_train:], y[n_train:]))


class Classifier(L.LightningModule):
    def __init__(self, dim: int, classes: int, args) -> None:
        super().__init__()
        self.args = args
        self.net = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, classes))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        a = self.args
        if a.optimizer == "sam":
            opt = fused_flat.SAM(self.net.parameters(), lr=a.lr, momentum=0.9, rho=0.05)
        else:
            opt = fused_flat.FSGLD(self.net.parameters(), lr=a.lr, beta=a.beta, eta=0.01,
                                   momentum=0.9, weight_decay=5e-4, seed=a.seed)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, a.epochs))
        return {"optimizer": opt, "lr_scheduler": sched}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", choices=("fsgld", "sam"), default="fsgld")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--accumulate", type=int, default=2,
                   help="accumulate_grad_batches (SAM: forced to 1, see FusedFlatCallback)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--beta", type=float, default=1e6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a few steps, seconds on CPU")
    a = p.parse_args(argv)
    if a.smoke:
        a.epochs = 2
    if a.optimizer == "sam" and a.accumulate != 1:
        print("SAM under automatic optimization needs accumulate_grad_batches=1; using 1")
        a.accumulate = 1
    torch.manual_seed(a.seed)
    n = 256 if a.smoke else 2048
    train, val = blobs(n, 512, 4, 8, seed=a.seed)
    model = Classifier(8, 4, a)
    trainer = L.Trainer(
        max_epochs=a.epochs, accumulate_grad_batches=a.accumulate, accelerator="cpu", devices=1,
        callbacks=[FusedFlatCallback()], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_train_batches=4 if a.smoke else 1.0, limit_val_batches=2 if a.smoke else 1.0)
    trainer.fit(model, torch.utils.data.DataLoader(train, batch_size=a.batch_size, shuffle=True),
                torch.utils.data.DataLoader(val, batch_size=256))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print(f"{a.optimizer}: val_loss {metrics['val_loss']:.4f}  val_acc {metrics['val_acc']:.3f}")
    return metrics


if __name__ == "__main__":
    main()
