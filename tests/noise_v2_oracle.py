"""Layout-v2 oracles of the noise stream (ALGORITHMS.md §1) used by the multi-tensor tests,
in plain torch on fused_flat.noise's Philox4x32-10 (bit-exact uint32 words)."""
from __future__ import annotations

import torch

from fused_flat import noise


def words_v2(seed: int, bucket_id: int, step: int, tag: int, offset: int, n: int) -> torch.Tensor:
    """w(tag, i) = x_(i & 3) of Philox call j = i >> 2, for i in [offset, offset + n)."""
    i = torch.arange(offset, offset + n, dtype=torch.int64)
    j = i >> 2
    k0, k1 = noise.key_of(seed, bucket_id)
    words = noise.philox4x32_10(j & noise.MASK32, (j >> 32) & noise.MASK32,
                                torch.full_like(j, step & noise.MASK32),
                                torch.full_like(j, tag & noise.MASK32), k0, k1)
    return torch.stack(words, 1).gather(1, (i & 3).unsqueeze(1)).squeeze(1)


def rademacher_v2_oracle(seed: int, bucket_id: int, step: int, offset: int, n: int) -> torch.Tensor:
    """RW-SAM probe: -1 where the top bit of w(16, i) is set, else +1 (float32)."""
    w = words_v2(seed, bucket_id, step, 16, offset, n)
    return 1.0 - 2.0 * (w >> 31).to(torch.float32)
