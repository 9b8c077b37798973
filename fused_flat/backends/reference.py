"""The pure-torch reference backend: the readable spec, the test oracle, the fallback.

Same signatures and same math as the compiled ops (csrc/), written the obvious way,
one torch op at a time, with the noise stream of fused_flat.noise. Work is chunked so
the temporaries stay bounded (CHUNK elements) whatever the bucket size.
"""
from __future__ import annotations

import torch

from fused_flat import noise

CHUNK = 1 << 20


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def perturb_(param: torch.Tensor, seed: int, bucket_id: int, step: int, tag: int, sigma: float,
             offset: int = 0) -> None:
    """theta <- theta + sigma * eps(tag) over elements [offset, offset + numel) of the bucket."""
    if sigma == 0.0:
        return
    acc = _acc_dtype(param)
    for s in range(0, param.numel(), CHUNK):
        seg = param[s:s + CHUNK]
        eps = noise.normal_noise(seed, bucket_id, step, tag, offset + s, seg.numel(), param.device)
        seg.copy_(seg.to(acc) + sigma * eps.to(acc))


def restore_and_step_(param: torch.Tensor, grad: torch.Tensor, momentum_buffer: torch.Tensor | None,
                      grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None, seed: int,
                      bucket_id: int, step: int, offset: int, restore_tag: int, sigma: float,
                      lr: float, weight_decay: float, momentum: float, dampening: float,
                      nesterov: bool, momentum_init: bool, noise_std: float, grad_mult: float,
                      stochastic_rounding: bool = False) -> None:
    """ALGORITHMS.md §2, one chunk at a time:

        theta <- theta - sigma * eps(restore_tag)          (restore)
        d     <- g * grad_mult [/ grad_scale] + wd * theta
        m     <- d on the first step, else mu * m + (1 - dampening) * d ;  d <- m  (or d + mu * m)
        theta <- theta - lr * d + noise_std * xi(tag 32)

    A set ``found_inf`` skips everything but the restore. eps(tag) = z(tag, i) and
    xi = z(32, i) of the noise stream, layout version 3 (fused_flat.noise).

    ``stochastic_rounding``: a bf16 / fp16 ``param`` receives the stochastically rounded
    fp32 result (fused_flat.noise.stochastic_round with the rbits of sr_bits: tags 0 and
    32 of this step) instead of the round-to-nearest one. The momentum buffer and the
    skipped step's restore (found_inf) stay round-to-nearest; fp32 / fp64 params ignore
    the flag (nothing to round).
    """
    if found_inf is not None and float(found_inf) != 0.0:
        perturb_(param, seed, bucket_id, step, restore_tag, -sigma, offset)
        return
    mult = grad_mult / float(grad_scale) if grad_scale is not None else grad_mult
    acc = _acc_dtype(param)
    for s in range(0, param.numel(), CHUNK):
        p, g = param[s:s + CHUNK], grad[s:s + CHUNK]
        n = p.numel()
        theta = p.to(acc)
        if sigma != 0.0:
            eps = noise.normal_noise(seed, bucket_id, step, restore_tag, offset + s, n, p.device)
            theta = theta - sigma * eps.to(acc)
        d = sgd_direction(g, theta, momentum_buffer, s, acc, mult, weight_decay, momentum,
                          dampening, nesterov, momentum_init)
        theta = theta - lr * d
        if noise_std != 0.0:
            xi = noise.normal_noise(seed, bucket_id, step, noise.TAG_XI, offset + s, n, p.device)
            theta = theta + noise_std * xi.to(acc)
        if stochastic_rounding and p.dtype in (torch.bfloat16, torch.float16):
            rbits = noise.sr_bits(seed, bucket_id, step, offset + s, n, p.device)
            p.copy_(noise.stochastic_round(theta, rbits, p.dtype))
        else:
            p.copy_(theta)


def sgd_direction(g: torch.Tensor, theta: torch.Tensor, momentum_buffer: torch.Tensor | None,
                  s: int, acc: torch.dtype, mult: float, weight_decay: float, momentum: float,
                  dampening: float, nesterov: bool, momentum_init: bool) -> torch.Tensor:
    """torch.optim.SGD's step direction for the chunk at ``s`` (``g`` and ``theta`` that
    chunk's gradient and weights, ``theta`` already in ``acc``):

        d <- g * mult + wd * theta ;  m <- d (first step) or mu m + (1 - dampening) d
        d <- m  (or d + mu m with nesterov)

    writing the momentum buffer's chunk (both optimizer families: sam_reference too)."""
    d = g.to(acc) * mult
    d = d + weight_decay * theta
    if momentum_buffer is not None:
        m = momentum_buffer[s:s + theta.numel()]
        buf = d if momentum_init else momentum * m.to(acc) + (1.0 - dampening) * d
        m.copy_(buf)
        d = d + momentum * buf if nesterov else buf
    return d


def perturb_from_(param: torch.Tensor, master: torch.Tensor, seed: int, bucket_id: int, step: int,
                  tag: int, sigma: float, offset: int = 0) -> None:
    """param <- round-to-nearest(master + sigma * eps(tag)) over bucket elements
    [offset, offset + numel): the perturbation of a 16-bit model from fp32 master weights.
    Math in fp32 (fp64 when master is fp64); ``param`` may have any floating dtype.
    sigma = 0 copies master into param (rounded)."""
    if master.numel() != param.numel():
        raise ValueError(f"perturb_from_: master has {master.numel()} elements, param {param.numel()}")
    acc = _acc_dtype(master)
    for s in range(0, param.numel(), CHUNK):
        p, m = param[s:s + CHUNK], master[s:s + CHUNK]
        theta = m.to(acc)
        if sigma != 0.0:
            eps = noise.normal_noise(seed, bucket_id, step, tag, offset + s, p.numel(), p.device)
            theta = theta + sigma * eps.to(acc)
        p.copy_(theta)


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """found_inf: a 1-element float32 tensor on the tensors' device, 1.0 if any element of
    any tensor is inf or nan, else 0.0 (the compiled ``fused_flat::all_finite``)."""
    device = tensors[0].device if tensors else torch.device("cpu")
    found = torch.zeros(1, dtype=torch.float32, device=device)
    for t in tensors:
        if t.numel():
            found = torch.maximum(found, (~torch.isfinite(t)).any().to(torch.float32).reshape(1))
    return found
