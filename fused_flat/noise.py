"""The noise stream of ALGORITHMS.md §1 (layout version 2) in pure torch: the readable spec.

Every random number of fused_flat is a pure function of (seed, bucket_id, step, tag, i):

    key      = (seed_lo32 ^ bucket_id, seed_hi32)
    j        = i >> 2                                  (one Philox call serves 4 elements)
    counter  = (j_lo32, j_hi32, step_lo32, tag)
    x0..x3   = Philox4x32-10(counter, key)
    (a, b)   = (x0, x1) if ((i >> 1) & 1) == 0 else (x2, x3)
    u(x)     = ((x >> 8) + 0.5) * 2^-24               (fp32)
    r        = sqrt(-2 ln u(a)),  t = 2 pi u(b)
    z(tag,i) = r cos t if i is even else r sin t      (standard normal)
    w(tag,i) = x_(i & 3)                              (the element's own word)

Tags: eps of perturbation n is z(n, i), n = 0..15; xi (Langevin noise) is z(32, i); the
RW-SAM Rademacher probe is the sign of the top bit of w(16, i).

uint32 words are held in int64 tensors; the 32x32 -> 64 bit product is split in 16-bit
halves so no intermediate leaves int64's range.
"""
from __future__ import annotations

import math

import torch

LAYOUT_VERSION = 2

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF

TAG_EPS = 0            # eps of perturbation n is tag TAG_EPS + n, n = 0..15
TAG_PAIR = TAG_EPS     # layout-v1 name of tag 0, kept for importers
TAG_RADEMACHER = 16
TAG_XI = 32


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * m for int64 tensors a in [0, 2^32) and constant m."""
    m_lo, m_hi = m & 0xFFFF, m >> 16
    p_lo = a * m_lo                       # < 2^48
    p_hi = a * m_hi                       # < 2^48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    lo = mid & MASK32
    hi = ((p_hi >> 16) + (mid >> 32)) & MASK32
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on int64 tensors of uint32 words (Random123 constants)."""
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def key_of(seed: int, bucket_id: int) -> tuple[int, int]:
    return (seed & MASK32) ^ (bucket_id & MASK32), (seed >> 32) & MASK32


def philox_words(seed: int, bucket_id: int, step: int, tag: int, first_call: int, n_calls: int,
                 device=None) -> torch.Tensor:
    """Words of Philox calls [first_call, first_call + n_calls) as int64 [n_calls, 4]
    (first_call is read as a uint64 bit pattern). Call j serves elements 4j .. 4j+3."""
    k0, k1 = key_of(seed, bucket_id)
    first = first_call - 2 ** 64 if first_call >= 2 ** 63 else first_call
    j = torch.arange(n_calls, dtype=torch.int64, device=device) + first
    c2 = torch.full_like(j, step & MASK32)
    c3 = torch.full_like(j, tag & MASK32)
    return torch.stack(philox4x32_10(j & MASK32, (j >> 32) & MASK32, c2, c3, k0, k1), dim=1)


def uniform24(x: torch.Tensor) -> torch.Tensor:
    """u(x) = ((x >> 8) + 0.5) * 2^-24 as fp32 operations."""
    return ((x >> 8).to(torch.float32) + 0.5) * (2.0 ** -24)


def _calls(seed, bucket_id, step, tag, offset, n, device):
    """Words of the calls covering elements [offset, offset + n), and each element's row."""
    first, last = offset >> 2, (offset + n - 1) >> 2
    w = philox_words(seed, bucket_id, step, tag, first, last - first + 1, device)
    i = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    return w, i, (i >> 2) - first


def element_words(seed: int, bucket_id: int, step: int, tag: int, offset: int, n: int,
                  device=None) -> torch.Tensor:
    """w(tag, i) = x_(i & 3) of elements [offset, offset + n), as int64 in [0, 2^32)."""
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    w, i, row = _calls(seed, bucket_id, step, tag, offset, n, device)
    return w[row, i & 3]


def normal_noise(seed: int, bucket_id: int, step: int, tag: int, offset: int, n: int,
                 device=None) -> torch.Tensor:
    """z(tag, i) of elements [offset, offset + n) of a bucket, float32 (standard normal)."""
    if n == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    w, i, row = _calls(seed, bucket_id, step, tag, offset, n, device)
    second = ((i >> 1) & 1) * 2                    # 0: pair (x0, x1); 2: pair (x2, x3)
    a = w[row, second]
    b = w[row, second + 1]
    r = torch.sqrt(-2.0 * torch.log(uniform24(a)))
    t = (2.0 * math.pi) * uniform24(b)
    return torch.where((i & 1).bool(), r * torch.sin(t), r * torch.cos(t))


def gaussian_noise(seed: int, bucket_id: int, step: int, tag: int, offset: int, n: int,
                   device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, xi) of elements [offset, offset + n): eps = z(tag, i), xi = z(TAG_XI, i).

    Layout v2 compatibility helper: what a pass with restore tag ``tag`` uses."""
    return (normal_noise(seed, bucket_id, step, tag, offset, n, device),
            normal_noise(seed, bucket_id, step, TAG_XI, offset, n, device))


def rademacher(seed: int, bucket_id: int, step: int, offset: int, n: int, device=None) -> torch.Tensor:
    """RW-SAM probe v in {+1, -1}: -1 where the top bit of w(16, i) is set."""
    if n == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    w = element_words(seed, bucket_id, step, TAG_RADEMACHER, offset, n, device)
    return 1.0 - 2.0 * (w >> 31).to(torch.float32)
