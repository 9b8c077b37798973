"""Unfused speed peers of the benchmarks: paper-style fSGLD and davda54-style SAM.

These are not fused_flat backends and are not used for correctness; they reproduce the
*memory traffic and kernel launches* of the code people run today, so that a speedup is
measured against what a user would otherwise use.

PaperFSGLD follows the released code of the fSGLD paper (youngsikhwang/Flatness-aware-SGLD,
``optimizers.py``, class ``fSGLD``), with its order of operations:

  1. zero the gradients;
  2. for every parameter: eps = sigma * randn_like(p), p += eps, eps kept in a list;
  3. closure() (forward + backward at the perturbed point);
  4. for every parameter: p -= eps (the stored noise);
  5. Langevin noise: momentum 0 -> p += randn_like(p) * sqrt(2 lr / beta);
     momentum > 0 -> momentum_buffer += randn_like(buf) * sqrt(2 (1 - momentum) / beta)
     (the released code adds the noise to the buffer in that case);
  6. torch.optim.SGD.step() (the released code builds it with dampening = 1 - lr);
  7. zero_grad() (set_to_none).

Here sigma is given as in fused_flat's coupling, sigma = beta ** (-(1 + eta) / 4), unless
passed explicitly; the released code takes sigma and beta_inv as separate arguments.

DavdaSAM follows davda54/sam (``sam.py``): first_step stores the old weights, adds
e_w = rho * g / (||g|| + 1e-12) per parameter (one global norm); second_step restores
``p.data = old_p`` and calls the base optimizer's step.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


class PaperFSGLD(torch.optim.Optimizer):
    """fSGLD as the paper's released code does it (unfused; ``randn_like`` per parameter)."""

    def __init__(self, params, lr: float = 0.1, beta: float = 1e8, eta: float = 0.01,
                 sigma: float | None = None, momentum: float = 0.0, weight_decay: float = 5e-4):
        if sigma is None:
            sigma = beta ** (-(1.0 + eta) / 4.0)
        defaults = dict(lr=lr, beta=beta, sigma=sigma, momentum=momentum, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.base_opt = torch.optim.SGD(self.param_groups, lr=lr, momentum=momentum,
                                        weight_decay=weight_decay,
                                        dampening=(1 - lr) if momentum > 0 else 0.0)

    def step(self, closure: Callable[[], torch.Tensor]):  # type: ignore[override]
        if closure is None:
            raise RuntimeError("PaperFSGLD.step needs a closure (forward + backward)")
        group = self.param_groups[0]
        params = [p for g in self.param_groups for p in g["params"]]
        sigma, lr, beta, mom = group["sigma"], group["lr"], group["beta"], group["momentum"]
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.grad.zero_()
            saved = []
            for p in params:
                e = sigma * torch.randn_like(p)
                p.add_(e)
                saved.append(e)
        with torch.enable_grad():
            loss = closure()
        with torch.no_grad():
            for p, e in zip(params, saved):
                p.sub_(e)
            del saved
            if mom > 0:
                std = math.sqrt(2.0 * (1.0 - mom) / beta)
                for p in params:
                    if p.grad is None:
                        continue
                    st = self.base_opt.state[p]
                    if "momentum_buffer" not in st:
                        st["momentum_buffer"] = torch.zeros_like(p)
                    st["momentum_buffer"].add_(torch.randn_like(p) * std)
            else:
                std = math.sqrt(2.0 * lr / beta)
                for p in params:
                    p.add_(torch.randn_like(p) * std)
        self.base_opt.step()
        self.zero_grad()
        return loss


class DavdaSAM(torch.optim.Optimizer):
    """SAM as davda54/sam does it: first_step / second_step around a base optimizer."""

    def __init__(self, params, base_optimizer=torch.optim.SGD, rho: float = 0.05,
                 adaptive: bool = False, **kwargs):
        if rho < 0:
            raise ValueError(f"invalid rho {rho}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]):  # type: ignore[override]
        """closure() must do zero_grad-free forward + backward (as in davda54/sam)."""
        if closure is None:
            raise RuntimeError("DavdaSAM.step needs a closure")
        with torch.enable_grad():
            loss = closure()
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            closure()
        self.second_step()
        return loss

    def _grad_norm(self) -> torch.Tensor:
        dev = self.param_groups[0]["params"][0].device
        return torch.norm(torch.stack([
            ((torch.abs(p) if g["adaptive"] else 1.0) * p.grad).norm(p=2).to(dev)
            for g in self.param_groups for p in g["params"] if p.grad is not None]), p=2)
