"""Layout-3 oracles of the noise stream (ALGORITHMS.md §1) used by the multi-tensor tests, in
plain torch: the key and counter are built here from the spec's text, independently of
fused_flat.noise.stream_words; only the Philox4x32-10 rounds (checked against Random123's
known answers in tests/test_noise.py) are fused_flat.noise's."""
from __future__ import annotations

import torch

from fused_flat import noise

M32 = 0xFFFFFFFF


def words_v3(seed: int, bucket_id: int, step: int, tag: int, offset: int, n: int) -> torch.Tensor:
    """w(tag, i) = x_(i & 3) of Philox call j = i >> 2, for i in [offset, offset + n):
    key (seed_lo32, seed_hi32), counter (j_lo32, j_hi32, step_lo32, tag | bucket_id << 8)."""
    assert 0 <= tag < 256 and 0 <= bucket_id < 2 ** 24
    i = torch.arange(offset, offset + n, dtype=torch.int64)
    j = i >> 2
    words = noise.philox4x32_10(j & M32, (j >> 32) & M32, torch.full_like(j, step & M32),
                                torch.full_like(j, tag + bucket_id * 256), seed & M32, seed >> 32)
    return torch.stack(words, 1).gather(1, (i & 3).unsqueeze(1)).squeeze(1)


def rademacher_v3_oracle(seed: int, bucket_id: int, step: int, offset: int, n: int) -> torch.Tensor:
    """RW-SAM probe: -1 where the top bit of w(16, i) is set, else +1 (float32)."""
    w = words_v3(seed, bucket_id, step, 16, offset, n)
    return 1.0 - 2.0 * (w >> 31).to(torch.float32)
