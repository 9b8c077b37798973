"""The pure-torch reference backend: the readable spec, the test oracle, the fallback.

Same signatures and same math as the compiled ops (csrc/), written the obvious way,
one torch op at a time, with the noise stream of fused_flat.noise. Work is chunked so
the temporaries stay bounded (CHUNK elements) whatever the bucket size.

The per-step values (``step``, ``lr``, ``noise_std``) are numbers or one-element tensors
(a 0-dim int64 step counter, float lr / noise_std): tensors are used in the computation,
never read on the host, so torch.compile takes them as graph inputs (no guard on their
values) and a CUDA tensor costs no sync; a CPU tensor used with tensors on another device
is copied there (``non_blocking``). ``found_inf`` and ``grad_scale`` are read the same way.
The results are the same bits either way.
"""
from __future__ import annotations

import functools

import torch

from fused_flat import noise

CHUNK = 1 << 20


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def on(v, device: torch.device):
    """A per-step value as the computation takes it: a number as it is; a one-element tensor
    as a 0-dim tensor on ``device`` (a copy when it is elsewhere, ``non_blocking``: no host
    read, no sync). A 0-dim float64 lr multiplies a float32 tensor as the number does (the
    value is rounded to the tensor's dtype first): the same bits."""
    if isinstance(v, torch.Tensor):
        return v.to(device=device, non_blocking=True).reshape(())
    return v


def skip_flag(found_inf: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """``found_inf`` (one element, nonzero: skip the step) as a 0-dim bool tensor on
    ``device``, for ``torch.where`` (no host read); None without one."""
    return None if found_inf is None else on(found_inf, device) != 0


def grad_multiplier(grad_mult: float, grad_scale: torch.Tensor | None, device: torch.device):
    """grad_mult / grad_scale, in float64: a number without ``grad_scale``, else a 0-dim
    float64 tensor on ``device`` (a true division: ``number / tensor`` would be a reciprocal
    and a product, another rounding)."""
    if grad_scale is None:
        return grad_mult
    gs = on(grad_scale, device).to(torch.float64)
    return torch.full_like(gs, grad_mult).div(gs)


def add_noise(theta: torch.Tensor, noise_std, xi) -> torch.Tensor:
    """theta + noise_std * xi, where ``xi()`` makes the noise; theta itself when noise_std
    is 0 (also a 0 held in a tensor: selected in the computation, so that theta = -0.0
    stays -0.0 as with the number)."""
    if not isinstance(noise_std, torch.Tensor):
        return theta if noise_std == 0.0 else theta + noise_std * xi().to(theta.dtype)
    return torch.where(noise_std != 0, theta + noise_std * xi().to(theta.dtype), theta)


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

    A set ``found_inf`` skips everything but the restore (selected per element with
    ``torch.where``: no host read). eps(tag) = z(tag, i) and
    xi = z(32, i) of the noise stream, layout version 3 (fused_flat.noise).

    ``stochastic_rounding``: a bf16 / fp16 ``param`` receives the stochastically rounded
    fp32 result (fused_flat.noise.stochastic_round with the rbits of sr_bits: tags 0 and
    32 of this step) instead of the round-to-nearest one. The momentum buffer and the
    skipped step's restore (found_inf) stay round-to-nearest; fp32 / fp64 params ignore
    the flag (nothing to round).
    """
    dev = param.device
    skip = skip_flag(found_inf, dev)
    mult = grad_multiplier(grad_mult, grad_scale, dev)
    step, lr, noise_std = on(step, dev), on(lr, dev), on(noise_std, dev)
    acc = _acc_dtype(param)
    for s in range(0, param.numel(), CHUNK):
        p, g = param[s:s + CHUNK], grad[s:s + CHUNK]
        n = p.numel()
        theta = p.to(acc)
        if sigma != 0.0:
            eps = noise.normal_noise(seed, bucket_id, step, restore_tag, offset + s, n, dev)
            theta = theta - sigma * eps.to(acc)
        restored = theta   # what a skipped step leaves (round-to-nearest)
        d = sgd_direction(g, theta, momentum_buffer, s, acc, mult, weight_decay, momentum,
                          dampening, nesterov, momentum_init, skip)
        theta = theta - lr * d
        theta = add_noise(theta, noise_std, functools.partial(
            noise.normal_noise, seed, bucket_id, step, noise.TAG_XI, offset + s, n, dev))
        if stochastic_rounding and p.dtype in (torch.bfloat16, torch.float16):
            rbits = noise.sr_bits(seed, bucket_id, step, offset + s, n, dev)
            new = noise.stochastic_round(theta, rbits, p.dtype)
        else:
            new = theta.to(p.dtype)
        p.copy_(new if skip is None else torch.where(skip, restored.to(p.dtype), new))


def sgd_direction(g: torch.Tensor, theta: torch.Tensor, momentum_buffer: torch.Tensor | None,
                  s: int, acc: torch.dtype, mult, weight_decay: float, momentum: float,
                  dampening: float, nesterov: bool, momentum_init: bool,
                  skip: torch.Tensor | None = None) -> torch.Tensor:
    """torch.optim.SGD's step direction for the chunk at ``s`` (``g`` and ``theta`` that
    chunk's gradient and weights, ``theta`` already in ``acc``; ``mult`` a number or a 0-dim
    tensor, :func:`grad_multiplier`):

        d <- g * mult + wd * theta ;  m <- d (first step) or mu m + (1 - dampening) d
        d <- m  (or d + mu m with nesterov)

    writing the momentum buffer's chunk (both optimizer families: sam_reference too), unless
    ``skip`` (a 0-dim bool tensor, :func:`skip_flag`) is set: the buffer then keeps its
    values."""
    d = g.to(acc) * mult
    d = d + weight_decay * theta
    if momentum_buffer is not None:
        m = momentum_buffer[s:s + theta.numel()]
        buf = d if momentum_init else momentum * m.to(acc) + (1.0 - dampening) * d
        m.copy_(buf if skip is None else torch.where(skip, m, buf.to(m.dtype)))
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
