"""The noise stream of ALGORITHMS.md §1 (layout version 3) in pure torch: the readable spec.

Every random number of fused_flat is a pure function of (seed, bucket_id, step, tag, i):

    key      = (seed_lo32, seed_hi32)                  (the whole seed)
    j        = i >> 2                                  (one Philox call serves 4 elements)
    counter  = (j_lo32, j_hi32, step_lo32, tag | (bucket_id << 8))   tag < 256, bucket_id < 2^24
    x0..x3   = Philox4x32-10(counter, key)
    (a, b)   = (x0, x1) if ((i >> 1) & 1) == 0 else (x2, x3)
    u(x)     = ((x >> 8) + 0.5) * 2^-24               (fp32)
    r        = sqrt(-2 ln u(a)),  t = 2 pi u(b)
    z(tag,i) = r cos t if i is even else r sin t      (standard normal)
    w(tag,i) = x_(i & 3)                              (the element's own word)

Tags: eps of perturbation n is z(n, i), n = 0..15; xi (Langevin noise) is z(32, i); the
RW-SAM Rademacher probe is the sign of the top bit of w(16, i).

Layout 3 differs from layout 2 only in the key and counter word 3: layout 2 keyed Philox
with (seed_lo32 ^ bucket_id, seed_hi32), so (seed s + 1, bucket 0) drew the numbers of
(seed s, bucket 1). ``stream_words`` is the one place the key and word 3 are built.

The step may be an int or a one-element integer tensor (``philox_words``): a step counter
that torch.compile takes as a graph input is used in the computation, never read on the host.

uint32 words are held in int64 tensors; the 32x32 -> 64 bit product is split in 16-bit
halves so no intermediate leaves int64's range.
"""
from __future__ import annotations

import math

import torch

LAYOUT_VERSION = 3

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF

TAG_EPS = 0            # eps of perturbation n is tag TAG_EPS + n, n = 0..15
TAG_PAIR = TAG_EPS     # layout-v1 name of tag 0, kept for importers
TAG_RADEMACHER = 16
TAG_XI = 32
TAG_LIMIT = 1 << 8         # tags live in the low byte of counter word 3
BUCKET_LIMIT = 1 << 24     # bucket ids in its high 24 bits


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


def check_bucket_id(bucket_id: int) -> None:
    """ValueError unless 0 <= bucket_id < 2^24 (the bucket id's bits in counter word 3)."""
    if not 0 <= bucket_id < BUCKET_LIMIT:
        raise ValueError(f"fused_flat: bucket_id must be in [0, 2^24), got {bucket_id} (noise "
                         f"layout 3 keeps it in 24 bits of the Philox counter)")


def stream_words(seed: int, bucket_id: int, tag: int) -> tuple[int, int, int]:
    """(k0, k1, c3): the Philox key (seed_lo32, seed_hi32) and counter word 3,
    tag | (bucket_id << 8). ValueError for a tag outside [0, 256) or a bucket id outside
    [0, 2^24)."""
    check_bucket_id(bucket_id)
    if not 0 <= tag < TAG_LIMIT:
        raise ValueError(f"fused_flat: tag must be in [0, 256), got {tag}")
    return seed & MASK32, (seed >> 32) & MASK32, tag | (bucket_id << 8)


def philox_words(seed: int, bucket_id: int, step, tag: int, first_call: int, n_calls: int,
                 device=None) -> torch.Tensor:
    """Words of Philox calls [first_call, first_call + n_calls) as int64 [n_calls, 4]
    (first_call is read as a uint64 bit pattern). Call j serves elements 4j .. 4j+3.

    ``step``: an int, or a one-element integer tensor (a step counter that torch.compile
    takes as a graph input, or one on the device under ``capturable=True``), read in the
    computation, never on the host; one on another device than ``device`` is copied there
    (``non_blocking``: a CPU counter to a GPU needs no sync)."""
    k0, k1, w3 = stream_words(seed, bucket_id, tag)
    first = first_call - 2 ** 64 if first_call >= 2 ** 63 else first_call
    j = torch.arange(n_calls, dtype=torch.int64, device=device) + first
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.dtype.is_floating_point or step.is_complex():
            raise ValueError(f"fused_flat.noise: step must be an int or a one-element integer "
                             f"tensor, got a {step.dtype} tensor of shape {tuple(step.shape)}")
        s = step.to(device=j.device, dtype=torch.int64, non_blocking=True).reshape(())
        c2 = (s & MASK32).expand_as(j)
    else:
        c2 = torch.full_like(j, step & MASK32)
    c3 = torch.full_like(j, w3)
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


def element_words(seed: int, bucket_id: int, step: int | torch.Tensor, tag: int, offset: int,
                  n: int, device=None) -> torch.Tensor:
    """w(tag, i) = x_(i & 3) of elements [offset, offset + n), as int64 in [0, 2^32)."""
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    w, i, row = _calls(seed, bucket_id, step, tag, offset, n, device)
    return w[row, i & 3]


def normal_noise(seed: int, bucket_id: int, step: int | torch.Tensor, tag: int, offset: int,
                 n: int, device=None) -> torch.Tensor:
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


def gaussian_noise(seed: int, bucket_id: int, step: int | torch.Tensor, tag: int, offset: int,
                   n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, xi) of elements [offset, offset + n): eps = z(tag, i), xi = z(TAG_XI, i).

    Helper kept from layout 1's API: what a pass with restore tag ``tag`` uses."""
    return (normal_noise(seed, bucket_id, step, tag, offset, n, device),
            normal_noise(seed, bucket_id, step, TAG_XI, offset, n, device))


def rademacher(seed: int, bucket_id: int, step: int | torch.Tensor, offset: int, n: int,
               device=None) -> torch.Tensor:
    """RW-SAM probe v in {+1, -1}: -1 where the top bit of w(16, i) is set."""
    if n == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    w = element_words(seed, bucket_id, step, TAG_RADEMACHER, offset, n, device)
    return 1.0 - 2.0 * (w >> 31).to(torch.float32)


# ------------------------------------------------------------------ stochastic rounding
def sr_bits(seed: int, bucket_id: int, step: int | torch.Tensor, offset: int, n: int,
            device=None) -> torch.Tensor:
    """The stochastic-rounding bits of elements [offset, offset + n) at step ``step``, int64
    in [0, 2^16): rbits = (w(0, i) & 0xFF) | ((w(32, i) & 0xFF) << 8), the low bytes of the
    element's tag-0 and tag-32 Philox words (which u() discards)."""
    w0 = element_words(seed, bucket_id, step, TAG_EPS, offset, n, device)
    w32 = element_words(seed, bucket_id, step, TAG_XI, offset, n, device)
    return (w0 & 0xFF) | ((w32 & 0xFF) << 8)


def _bits_to(h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint16 bit patterns held in int64 -> a tensor of the 16-bit dtype."""
    return torch.where(h >= 0x8000, h - 0x10000, h).to(torch.int16).view(dtype)


def stochastic_round(x: torch.Tensor, rbits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Stochastic rounding of float32 ``x`` to bf16 / fp16 with 16-bit ``rbits`` (int64),
    as elementwise.h's sr_bf16_bits / sr_fp16_bits (ALGORITHMS.md §1):

        SR(x) = sign(x) * (floor(|x| / ulp) + up) * ulp,
        up    = 1 iff rbits + floor(2^16 * frac(|x| / ulp)) >= 2^16

    ulp is the 16-bit format's spacing at |x| (its binade; the subnormal spacing below the
    smallest normal): add rbits / 2^16 ulp to |x|, truncate toward zero. For bf16 that is
    "add rbits to the fp32 bit pattern and keep the high 16 bits". P(up) = frac(|x|/ulp),
    exactly unless more than 16 bits are discarded (fp16 below 2^-17: frac truncated to 16
    bits). Representable values are unchanged; rounding up past the largest finite value
    gives +-inf (fp16: |x| >= 65536 is inf); inf stays inf; NaN -> NaN.
    fp32 / fp64 ``dtype``: plain conversion (no rounding to do).
    """
    if dtype not in (torch.bfloat16, torch.float16):
        return x.to(dtype)
    x = x.to(torch.float32)
    u = x.view(torch.int32).to(torch.int64) & MASK32
    r = rbits.to(torch.int64) & 0xFFFF
    if dtype == torch.bfloat16:
        nonfinite = (u & 0x7F800000) == 0x7F800000
        nan = nonfinite & ((u & 0x007FFFFF) != 0)
        h = torch.where(nonfinite, u >> 16, (u + r) >> 16)
        h = torch.where(nan, torch.full_like(h, 0x7FC0), h)
        return _bits_to(h, dtype)
    sign = (u >> 16) & 0x8000
    m = u & 0x7FFFFFFF
    E = m >> 23
    sig = torch.where(E > 0, (m & 0x007FFFFF) | 0x00800000, m)
    shift = torch.where(E >= 113, torch.full_like(E, 13), torch.where(E == 0, torch.full_like(E, 125), 126 - E))
    S = torch.clamp(shift, max=40)
    k = sig >> S
    d = ((sig & ((torch.ones_like(S) << S) - 1)) << 16) >> S
    up = (r + d) >> 16
    h = torch.where(E >= 113, (E - 113) << 10, torch.zeros_like(E)) + k + up
    h = torch.clamp(h, max=0x7C00)
    h = torch.where(E == 0xFF, torch.where((m & 0x007FFFFF) != 0, torch.full_like(h, 0x7E00),
                                           torch.full_like(h, 0x7C00)), h)
    h = torch.where((E == 0xFF) & ((m & 0x007FFFFF) != 0), h, sign | h)
    return _bits_to(h, dtype)
