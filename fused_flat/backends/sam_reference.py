"""The pure-torch reference of the SAM-family ops: the readable spec, the test oracle and
the fallback (CUDA tensors, or no compiled extension).

Same signatures and same per-element math as csrc/cpu/sam_cpu.cpp
(csrc/include/fused_flat/sam_elementwise.h); work is chunked so temporaries stay bounded.
"""
from __future__ import annotations

import torch

from fused_flat import noise
from fused_flat.backends.reference import sgd_direction

CHUNK = 1 << 20


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def sam_grad_sq_norm(grad: torch.Tensor, param: torch.Tensor | None = None,
                     eta: float = 0.0) -> torch.Tensor:
    """sum_i t_i^2 in float64 (0-dim), t = g, or (|theta| + eta) * g when ``param`` is given
    (ASAM)."""
    total = torch.zeros((), dtype=torch.float64, device=grad.device)
    for s in range(0, grad.numel(), CHUNK):
        t = grad[s:s + CHUNK].to(_acc(grad)).double()
        if param is not None:
            t = (param[s:s + CHUNK].to(_acc(grad)).abs() + eta).double() * t
        total += (t * t).sum()
    return total


def sam_perturb_(param: torch.Tensor, grad: torch.Tensor, backup: torch.Tensor, adaptive: bool,
                 coef: float, eta: float = 0.0) -> None:
    """backup <- theta ; theta <- theta + (coef * s) * g, s = (|theta| + eta)^2 (ASAM) or 1."""
    backup.copy_(param)
    acc = _acc(param)
    for s in range(0, param.numel(), CHUNK):
        p = param[s:s + CHUNK]
        th = p.to(acc)
        t = th.abs() + eta
        scale = coef * (t * t) if adaptive else torch.full_like(th, coef)
        p.copy_(th + scale * grad[s:s + CHUNK].to(acc))


def sam_restore_and_step_(param: torch.Tensor, backup: torch.Tensor, grad: torch.Tensor,
                          momentum_buffer: torch.Tensor | None, grad_scale: torch.Tensor | None,
                          found_inf: torch.Tensor | None, lr: float, weight_decay: float,
                          momentum: float, dampening: float, nesterov: bool, momentum_init: bool,
                          grad_mult: float, stochastic_rounding: bool = False, seed: int = 0,
                          bucket_id: int = 0, step: int = 0, offset: int = 0) -> None:
    """theta <- backup, then torch.optim.SGD's update with d = g * grad_mult [/ grad_scale]:

        d <- d + wd * theta ;  m <- d (first step) or mu m + (1 - dampening) d
        d <- m (or d + mu m with nesterov) ;  theta <- theta - lr d

    A set ``found_inf`` only restores (the momentum is left untouched).
    ``stochastic_rounding``: a bf16/fp16 param gets the stochastically rounded theta
    (fused_flat.noise.stochastic_round) with the rbits of (seed, bucket_id, step) at bucket
    indices [offset, offset + numel): tags 0 and 32, as the Langevin passes. Ignored for
    fp32/fp64; the momentum buffer stays round-to-nearest.
    """
    if found_inf is not None and float(found_inf) != 0.0:
        param.copy_(backup)
        return
    mult = grad_mult / float(grad_scale) if grad_scale is not None else grad_mult
    acc = _acc(param)
    for s in range(0, param.numel(), CHUNK):
        th = backup[s:s + CHUNK].to(acc)
        d = sgd_direction(grad[s:s + CHUNK], th, momentum_buffer, s, acc, mult, weight_decay,
                          momentum, dampening, nesterov, momentum_init)
        new = th - lr * d
        p = param[s:s + CHUNK]
        if stochastic_rounding and p.dtype in (torch.bfloat16, torch.float16):
            rbits = noise.sr_bits(seed, bucket_id, step, offset + s, p.numel(), p.device)
            p.copy_(noise.stochastic_round(new, rbits, p.dtype))
        else:
            p.copy_(new)


def sam_probe_(param: torch.Tensor, backup: torch.Tensor, seed: int, bucket_id: int, step: int,
               delta: float, offset: int = 0) -> None:
    """backup <- theta ; theta <- theta + delta * v, v the Rademacher probe of tag 16."""
    backup.copy_(param)
    acc = _acc(param)
    for s in range(0, param.numel(), CHUNK):
        p = param[s:s + CHUNK]
        v = noise.rademacher(seed, bucket_id, step, offset + s, p.numel(), p.device)
        p.copy_(p.to(acc) + delta * v.to(acc))
