"""Typed Python entry points of the compiled ops (``torch.ops.fused_flat.*``).

The schemas are declared once, in csrc/bindings.cpp. Fake (meta) implementations are
registered here so the ops trace under ``torch.compile``. Importing this module never
fails: without the extension, calling an op raises with the reason and the fix.
"""
from __future__ import annotations

import torch

from fused_flat import _native


def _ops():
    if not _native.available():
        raise RuntimeError(
            f"fused_flat: the compiled extension is not available ({_native.load_error}); "
            f"{_native.BUILD_HINT}, or use backend='reference'."
        )
    return torch.ops.fused_flat


def perturb_(param: torch.Tensor, seed: int, bucket_id: int, step: int, tag: int, sigma: float,
             offset: int = 0) -> None:
    """theta <- theta + sigma * eps(tag), in place, over bucket elements [offset, offset + numel)."""
    _ops().perturb_(param, seed, bucket_id, step, tag, sigma, offset)


def restore_and_step_(param: torch.Tensor, grad: torch.Tensor, momentum_buffer: torch.Tensor | None,
                      grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None, seed: int,
                      bucket_id: int, step: int, offset: int, restore_tag: int, sigma: float,
                      lr: float, weight_decay: float, momentum: float, dampening: float,
                      nesterov: bool, momentum_init: bool, noise_std: float, grad_mult: float) -> None:
    """The fused restore + decay + momentum + Langevin + update pass (see reference.py)."""
    _ops().restore_and_step_(param, grad, momentum_buffer, grad_scale, found_inf, seed, bucket_id,
                             step, offset, restore_tag, sigma, lr, weight_decay, momentum,
                             dampening, nesterov, momentum_init, noise_std, grad_mult)


def philox_words(seed: int, bucket_id: int, step: int, tag: int, first_pair: int,
                 n_pairs: int) -> torch.Tensor:
    """Philox words of pairs [first_pair, first_pair + n_pairs), int64 [n_pairs, 4] (CPU)."""
    return _ops().philox_words(seed, bucket_id, step, tag, first_pair, n_pairs)


def gaussian_noise(seed: int, bucket_id: int, step: int, tag: int, offset: int,
                   n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, xi) of bucket elements [offset, offset + n) from one tag, float32 (CPU)."""
    return _ops().gaussian_noise(seed, bucket_id, step, tag, offset, n)


if _native.available():

    @torch.library.register_fake("fused_flat::perturb_")
    def _perturb_fake(param, seed, bucket_id, step, tag, sigma, offset=0):
        return None

    @torch.library.register_fake("fused_flat::restore_and_step_")
    def _restore_and_step_fake(param, grad, momentum_buffer, grad_scale, found_inf, seed, bucket_id,
                               step, offset, restore_tag, sigma, lr, weight_decay, momentum,
                               dampening, nesterov, momentum_init, noise_std, grad_mult):
        return None

    @torch.library.register_fake("fused_flat::philox_words")
    def _philox_words_fake(seed, bucket_id, step, tag, first_pair, n_pairs):
        return torch.empty((n_pairs, 4), dtype=torch.int64)

    @torch.library.register_fake("fused_flat::gaussian_noise")
    def _gaussian_noise_fake(seed, bucket_id, step, tag, offset, n):
        return torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.float32)
