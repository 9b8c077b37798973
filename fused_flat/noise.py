"""The noise stream of ALGORITHMS.md §1 in pure torch: the readable spec.

Every random number of fused_flat is a pure function of (seed, bucket_id, step, tag, i):

    key     = (seed_lo32 ^ bucket_id, seed_hi32)
    counter = (j_lo32, j_hi32, step_lo32, tag),  j = i >> 1
    x0..x3  = Philox4x32-10(counter, key)
    (a, b)  = (x0, x1) if i is even else (x2, x3)
    u(x)    = ((x >> 8) + 0.5) * 2^-24              (fp32)
    eps     = sqrt(-2 ln u(a)) cos(2 pi u(b)),  xi = sqrt(-2 ln u(a)) sin(2 pi u(b))

uint32 words are held in int64 tensors; the 32x32 -> 64 bit product is split in 16-bit
halves so no intermediate leaves int64's range.
"""
from __future__ import annotations

import math

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF

TAG_PAIR = 0
TAG_RADEMACHER = 16


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


def philox_words(seed: int, bucket_id: int, step: int, tag: int, first_pair: int, n_pairs: int,
                 device=None) -> torch.Tensor:
    """Words of pairs [first_pair, first_pair + n_pairs) as int64 [n_pairs, 4]
    (first_pair is read as a uint64 bit pattern)."""
    k0, k1 = key_of(seed, bucket_id)
    first = first_pair - 2 ** 64 if first_pair >= 2 ** 63 else first_pair
    j = torch.arange(n_pairs, dtype=torch.int64, device=device) + first
    c2 = torch.full_like(j, step & MASK32)
    c3 = torch.full_like(j, tag & MASK32)
    return torch.stack(philox4x32_10(j & MASK32, (j >> 32) & MASK32, c2, c3, k0, k1), dim=1)


def uniform24(x: torch.Tensor) -> torch.Tensor:
    """u(x) = ((x >> 8) + 0.5) * 2^-24 as fp32 operations."""
    return ((x >> 8).to(torch.float32) + 0.5) * (2.0 ** -24)


def _element_words(seed, bucket_id, step, tag, offset, n, device):
    first, last = offset >> 1, (offset + n - 1) >> 1
    w = philox_words(seed, bucket_id, step, tag, first, last - first + 1, device)
    i = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    row, odd = (i >> 1) - first, (i & 1).bool()
    a = torch.where(odd, w[row, 2], w[row, 0])
    b = torch.where(odd, w[row, 3], w[row, 1])
    return a, b


def gaussian_noise(seed: int, bucket_id: int, step: int, tag: int, offset: int, n: int,
                   device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, xi) of elements [offset, offset + n) of a bucket, float32, from one tag."""
    if n == 0:
        e = torch.empty(0, dtype=torch.float32, device=device)
        return e, e.clone()
    a, b = _element_words(seed, bucket_id, step, tag, offset, n, device)
    r = torch.sqrt(-2.0 * torch.log(uniform24(a)))
    t = (2.0 * math.pi) * uniform24(b)
    return r * torch.cos(t), r * torch.sin(t)


def rademacher(seed: int, bucket_id: int, step: int, offset: int, n: int, device=None) -> torch.Tensor:
    """RW-SAM probe v in {+1, -1} (tag 16): -1 where the top bit of x0 (even) / x2 (odd) is set."""
    if n == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    a, _ = _element_words(seed, bucket_id, step, TAG_RADEMACHER, offset, n, device)
    return 1.0 - 2.0 * (a >> 31).to(torch.float32)
