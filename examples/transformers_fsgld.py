"""fSGLD (or SAM) under Hugging Face ``transformers.Trainer``.

    python examples/transformers_fsgld.py --smoke            # a few seconds on CPU
    python examples/transformers_fsgld.py --epochs 5 --accumulate 4
    python examples/transformers_fsgld.py --optimizer sam    # FusedFlatTrainer

``Trainer`` calls ``optimizer.step()`` without a closure, so fSGLD needs
``FusedFlatCallback`` (it perturbs once at the start of every optimizer step; the Trainer's
``step()`` then restores and updates) and SAM needs ``FusedFlatTrainer`` (two
forward/backward passes per step). Both are exact with ``gradient_accumulation_steps > 1``
and evaluate / save unperturbed weights. The model is any ``nn.Module`` whose forward
returns ``{"loss": ..., "logits": ...}`` (here a small MLP on synthetic data; a
``PreTrainedModel`` works the same way). Needs ``pip install transformers accelerate``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # nothing here needs the Hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

try:
    import fused_flat
except ImportError:   # run from a source checkout that is not pip-installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fused_flat

try:
    from transformers import Trainer, TrainingArguments
except ImportError:
    sys.exit("this example needs transformers: pip install transformers accelerate")

from fused_flat.integrations.transformers import FusedFlatCallback, FusedFlatTrainer  # noqa: E402


class MLP(nn.Module):
    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class Blobs(torch.utils.data.Dataset):
    """Gaussian blobs, one per class; items are dicts as a tokenized text data set's are."""

    def __init__(self, x, y) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def blobs(n_train: int, n_val: int, classes: int, dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 1.5
    y = torch.randint(0, classes, (n_train + n_val,), generator=g)
    x = centers[y] + torch.randn(n_train + n_val, dim, generator=g)
    return Blobs(x[:n_train], y[:n_train]), Blobs(x[n_train:], y[n_train:])


def accuracy(pred) -> dict:
    logits, labels = pred.predictions, pred.label_ids
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", choices=("fsgld", "sam"), default="fsgld")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--accumulate", type=int, default=2, help="gradient_accumulation_steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--beta", type=float, default=1e6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default=None, help="default: a temporary directory")
    p.add_argument("--smoke", action="store_true", help="a few steps, seconds on CPU")
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    train, val = blobs(256 if a.smoke else 2048, 512, 4, 8, seed=a.seed)
    model = MLP(8, 4)
    if a.optimizer == "sam":
        opt = fused_flat.SAM(model.parameters(), lr=a.lr, momentum=0.9, rho=0.05)
        trainer_cls, callbacks = FusedFlatTrainer, []   # it adds FusedFlatCallback itself
    else:
        opt = fused_flat.FSGLD(model.parameters(), lr=a.lr, beta=a.beta, eta=0.01, momentum=0.9,
                               weight_decay=5e-4, seed=a.seed)
        trainer_cls, callbacks = Trainer, [FusedFlatCallback()]
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=a.output_dir or tmp, report_to=[], use_cpu=True, seed=a.seed,
            per_device_train_batch_size=a.batch_size, per_device_eval_batch_size=256,
            gradient_accumulation_steps=a.accumulate, num_train_epochs=a.epochs,
            max_steps=4 if a.smoke else -1, learning_rate=a.lr, lr_scheduler_type="cosine",
            eval_strategy="epoch" if not a.smoke else "steps", eval_steps=2,
            save_strategy="no", logging_strategy="no", disable_tqdm=True)
        trainer = trainer_cls(model=model, args=args, train_dataset=train, eval_dataset=val,
                              optimizers=(opt, None), callbacks=callbacks,
                              compute_metrics=accuracy)
        trainer.train()
        metrics = trainer.evaluate()
    print(f"{a.optimizer}: eval_loss {metrics['eval_loss']:.4f}  "
          f"eval_accuracy {metrics['eval_accuracy']:.3f}")
    return metrics


if __name__ == "__main__":
    main()
