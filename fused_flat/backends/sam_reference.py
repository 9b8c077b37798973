"""The pure-torch reference of the SAM-family ops: the readable spec, the test oracle and
the fallback (CUDA tensors, or no compiled extension).

Same signatures and same per-element math as csrc/cpu/sam_cpu.cpp
(csrc/include/fused_flat/sam_elementwise.h); work is chunked so temporaries stay bounded.
The per-step values (step, lr, coef) and found_inf / grad_scale may be tensors, used in the
computation and never read on the host, as in fused_flat.backends.reference.
"""
from __future__ import annotations

import torch

from fused_flat import noise
from fused_flat.backends.reference import grad_multiplier, on, sgd_direction, skip_flag

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
    """backup <- theta ; theta <- theta + (coef * s) * g, s = (|theta| + eta)^2 (ASAM) or 1.
    ``coef``: a number or a one-element tensor (a compiled first_step's)."""
    backup.copy_(param)
    acc = _acc(param)
    coef = on(coef, param.device)
    for s in range(0, param.numel(), CHUNK):
        p = param[s:s + CHUNK]
        th = p.to(acc)
        t = th.abs() + eta
        # coef rounded to acc first, as in the number form (full_like rounds it)
        scale = coef * (t * t) if adaptive else torch.ones_like(th) * coef
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

    A set ``found_inf`` only restores (the momentum is left untouched; selected per element
    with ``torch.where``: no host read).
    ``stochastic_rounding``: a bf16/fp16 param gets the stochastically rounded theta
    (fused_flat.noise.stochastic_round) with the rbits of (seed, bucket_id, step) at bucket
    indices [offset, offset + numel): tags 0 and 32, as the Langevin passes. Ignored for
    fp32/fp64; the momentum buffer stays round-to-nearest.
    """
    dev = param.device
    skip = skip_flag(found_inf, dev)
    mult = grad_multiplier(grad_mult, grad_scale, dev)
    step, lr = on(step, dev), on(lr, dev)
    acc = _acc(param)
    for s in range(0, param.numel(), CHUNK):
        bk = backup[s:s + CHUNK]
        th = bk.to(acc)
        d = sgd_direction(grad[s:s + CHUNK], th, momentum_buffer, s, acc, mult, weight_decay,
                          momentum, dampening, nesterov, momentum_init, skip)
        new = th - lr * d
        p = param[s:s + CHUNK]
        if stochastic_rounding and p.dtype in (torch.bfloat16, torch.float16):
            rbits = noise.sr_bits(seed, bucket_id, step, offset + s, p.numel(), dev)
            new = noise.stochastic_round(new, rbits, p.dtype)
        else:
            new = new.to(p.dtype)
        p.copy_(new if skip is None else torch.where(skip, bk.to(p.dtype), new))


def sam_probe_(param: torch.Tensor, backup: torch.Tensor, seed: int, bucket_id: int, step: int,
               delta: float, offset: int = 0) -> None:
    """backup <- theta ; theta <- theta + delta * v, v the Rademacher probe of tag 16."""
    backup.copy_(param)
    acc = _acc(param)
    for s in range(0, param.numel(), CHUNK):
        p = param[s:s + CHUNK]
        v = noise.rademacher(seed, bucket_id, step, offset + s, p.numel(), p.device)
        p.copy_(p.to(acc) + delta * v.to(acc))
