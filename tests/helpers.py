"""Test helpers shared by the optimizer tests."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fused_flat import noise
from fused_flat.optim.buckets import flat, round_up4


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


class RecordOps(TorchDispatchMode):
    """Records the registered ops of one namespace (``fused_flat_triton``,
    ``fused_flat``) that reach the dispatcher: (op name, {argument: value}), schema
    defaults filled in."""

    def __init__(self, namespace: str):
        super().__init__()
        self.namespace = namespace
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == self.namespace:
            schema = func._schema.arguments
            named = {a.name: a.default_value for a in schema if a.has_default_value()}
            named.update(zip([a.name for a in schema], args))
            named.update(kwargs)
            self.calls.append((func._schema.name.split("::")[1], named))
        return func(*args, **kwargs)
