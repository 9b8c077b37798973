"""Test helpers shared by the optimizer tests."""
from __future__ import annotations

import torch

from fused_flat import noise
from fused_flat.buckets import flat, round_up4


def bucket_noise(params, seed: int, bucket_id: int, step: int, tag: int = 0):
    """(eps, xi) of a bucket made of ``params`` (in order), concatenated per parameter in
    memory order, with the bucket index rule of ALGORITHMS.md (offsets rounded up to 4)."""
    eps, xi, off = [], [], 0
    for p in params:
        e, x = noise.gaussian_noise(seed, bucket_id, step, tag, off, p.numel())
        eps.append(e)
        xi.append(x)
        off += round_up4(p.numel())
    return torch.cat(eps), torch.cat(xi)


def flat_cat(tensors) -> torch.Tensor:
    """Parameters (or gradients) concatenated in memory order."""
    return torch.cat([flat(t.detach()) for t in tensors])
