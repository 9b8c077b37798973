"""The noise stream of ALGORITHMS.md §1 (layout version 3) as @triton.jit helpers,
matching elementwise.h.

Every helper reproduces the per-element math of csrc/include/fused_flat/elementwise.h
operation for operation (same fp32 constants, same order, bit manipulation through
bitcasts), so a Triton kernel gives the C++ kernels' numbers: the Philox words bit for
bit, eps/xi to ~1 ulp (only FMA contraction on the GPU may differ; the interpreter and
the C++ CPU build do not contract).

    key      = (seed_lo32, seed_hi32): the whole seed, passed as ONE int64 scalar ``key``
               (tl.philox's seed)
    counter  = (j_lo32, j_hi32, step_lo32, tag | bw), j = i >> 2, with the bucket word
               ``bw = bucket_id << 8`` passed as a second scalar (tag < 256, bucket_id < 2^24)
    element 4j + q: q = 0, 1 take r cos t, r sin t of the pair (x0, x1); q = 2, 3 of (x2, x3)
    w(tag, i) = x_(i & 3)

Kernels work on *calls*: one Philox call serves elements 4j .. 4j+3 of one tag, and the
four results are interleaved with tl.join + tl.reshape into element order. Every kernel
that draws noise takes (key, bw) from ``noise_key`` and hands both to the helpers below;
the tags (the pass's own, or 0 / 16 / 32 inside a kernel) are ORed with bw only in
``call_words``.

Also here: inspection kernels (words of calls, z and w of a range of elements) used by
the tests to compare the stream with fused_flat.noise and the C++ ops.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_flat import noise as _ref

MASK32 = 0xFFFFFFFF
TAG_XI: tl.constexpr = tl.constexpr(32)   # the Langevin noise xi is z(32, i)
TAG_RADEMACHER: tl.constexpr = tl.constexpr(16)   # the RW-SAM probe: top bit of w(16, i)


def noise_key(seed: int, bucket_id: int, tag: int = 0) -> tuple[int, int]:
    """(key, bw) of a bucket: tl.philox's 64-bit seed for the key (seed_lo32, seed_hi32), i.e.
    the seed itself (< 2^63), and the bucket word bucket_id << 8 of counter word 3, from
    fused_flat.noise.stream_words: ValueError for a bucket id outside [0, 2^24) or a ``tag``
    (only checked here) outside [0, 256)."""
    k0, k1, word3 = _ref.stream_words(seed, bucket_id, tag)
    return (k1 << 32) | k0, word3 ^ tag


@triton.jit
def call_words(key, bw, j, step_lo, tag):
    """Philox4x32-10 words (x0, x1, x2, x3) of call indices j (int64 tensor) at (step, tag)
    of the bucket whose word is bw: counter (j_lo, j_hi, step_lo, tag | bw)."""
    c0 = j.to(tl.uint32)                     # low 32 bits (truncation)
    c1 = (j >> 32).to(tl.uint32)
    c2 = (tl.zeros_like(j) + step_lo).to(tl.uint32)   # step_lo / tag may be python ints
    c3 = (tl.zeros_like(j) + (bw | tag)).to(tl.uint32)
    return tl.philox(key, c0, c1, c2, c3, 10)


@triton.jit
def uniform24(x):
    """((x >> 8) + 0.5) * 2^-24 in fp32: convert, add, multiply (each exact or RNE)."""
    return ((x >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08


@triton.jit
def log_unit(x):
    """ln(x) for x in (0, 1]: elementwise.h's branch-free Cephes logf, term for term."""
    bits = x.to(tl.uint32, bitcast=True)
    e = ((bits >> 23) & 0xFF).to(tl.int32) - 126
    m = ((bits & 0x007FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
    small = m < 0.707106781186547524
    e = tl.where(small, e - 1, e)
    m = tl.where(small, (m + m) - 1.0, m - 1.0)
    z = m * m
    y = tl.full(m.shape, 7.0376836292e-2, tl.float32)
    y = y * m - 1.1514610310e-1
    y = y * m + 1.1676998740e-1
    y = y * m - 1.2420140846e-1
    y = y * m + 1.4249322787e-1
    y = y * m - 1.6668057665e-1
    y = y * m + 2.0000714765e-1
    y = y * m - 2.4999993993e-1
    y = y * m + 3.3333331174e-1
    y = y * m * z
    fe = e.to(tl.float32)
    y = y + (-2.12194440e-4) * fe
    y = y - 0.5 * z
    return (m + y) + 0.693359375 * fe


@triton.jit
def sincos_2pi(u):
    """(cos(2 pi u), sin(2 pi u)) for u in [0, 1]: exact quadrant reduction in u, Cephes
    polynomials on [-pi/4, pi/4] (elementwise.h's sincos_2pi)."""
    v = 4.0 * u
    qi = (v + 0.5).to(tl.int32)              # truncation of v + 0.5 >= 0: nearest quadrant
    q = qi.to(tl.float32)
    a = (v - q) * 1.57079632679489662
    z = a * a
    sp = tl.full(a.shape, -1.9515295891e-4, tl.float32)
    sp = sp * z + 8.3321608736e-3
    sp = sp * z - 1.6666654611e-1
    sa = (sp * z) * a + a
    cp = tl.full(a.shape, 2.443315711809948e-5, tl.float32)
    cp = cp * z - 1.388731625493765e-3
    cp = cp * z + 4.166664568298827e-2
    ca = (cp * z) * z - 0.5 * z + 1.0
    quadrant = qi & 3
    odd_q = (quadrant & 1) != 0
    c0 = tl.where(odd_q, sa, ca)
    s0 = tl.where(odd_q, ca, sa)
    c = tl.where((quadrant == 1) | (quadrant == 2), -c0, c0)
    s = tl.where(quadrant >= 2, -s0, s0)
    return c, s


@triton.jit
def box_muller(a, b):
    """(eps, xi) = r (cos t, sin t), r = sqrt(-2 ln u(a)) (correctly rounded), t = 2 pi u(b)."""
    r = tl.sqrt_rn(-2.0 * log_unit(uniform24(a)))
    c, s = sincos_2pi(uniform24(b))
    return r * c, r * s


@triton.jit
def interleave4(z0, z1, z2, z3):
    """[Q] values of positions 0..3 of Q calls -> [4Q] in element order (4k, 4k+1, 4k+2, 4k+3)."""
    return tl.reshape(tl.join(tl.join(z0, z2), tl.join(z1, z3)), [4 * z0.shape[0]])


@triton.jit
def block_normals(key, bw, j, step_lo, tag):
    """z(tag, .) of the 4Q elements of calls j (a [Q] tensor), in element order: every
    Box-Muller output used."""
    x0, x1, x2, x3 = call_words(key, bw, j, step_lo, tag)
    z0, z1 = box_muller(x0, x1)
    z2, z3 = box_muller(x2, x3)
    return interleave4(z0, z1, z2, z3)


@triton.jit
def block_words(key, bw, j, step_lo, tag):
    """w(tag, .) = x_(i & 3) of the 4Q elements of calls j, in element order (uint32): the
    element's own word (stochastic-rounding bits, probes)."""
    x0, x1, x2, x3 = call_words(key, bw, j, step_lo, tag)
    return interleave4(x0, x1, x2, x3)


@triton.jit
def block_normals_words(key, bw, j, step_lo, tag):
    """(z(tag, .), w(tag, .)) of the 4Q elements of calls j from ONE Philox call per j."""
    x0, x1, x2, x3 = call_words(key, bw, j, step_lo, tag)
    z0, z1 = box_muller(x0, x1)
    z2, z3 = box_muller(x2, x3)
    return interleave4(z0, z1, z2, z3), interleave4(x0, x1, x2, x3)


@triton.jit
def index_words(key, bw, gi, step_lo, tag):
    """w(tag, gi) = x_(gi & 3) of any bucket indices gi (int64 tensor): one call per element
    (for element ranges that need not start on a call, e.g. a tensor of a list)."""
    x0, x1, x2, x3 = call_words(key, bw, gi >> 2, step_lo, tag)
    lane = gi & 3
    return tl.where(lane == 0, x0, tl.where(lane == 1, x1, tl.where(lane == 2, x2, x3)))


@triton.jit
def rademacher(key, bw, gi, step_lo):
    """The RW-SAM probe v_i in {+1, -1} of bucket indices gi: -1 where the top bit of
    w(16, gi) is set."""
    return tl.where((index_words(key, bw, gi, step_lo, TAG_RADEMACHER) >> 31) != 0, -1.0, 1.0)


# ------------------------------------------------------------------ stochastic rounding
@triton.jit
def sr_bits_of(w0, w32):
    """rbits = (w(0, i) & 0xFF) | ((w(32, i) & 0xFF) << 8) from the element's words (uint32)."""
    return (w0 & 0xFF) | ((w32 & 0xFF) << 8)


@triton.jit
def step_noise(key, bw, j, step_lo, restore_tag, NEED_EPS: tl.constexpr, NEED_XI: tl.constexpr,
               SR: tl.constexpr, EPS_TAG0: tl.constexpr, BLOCK: tl.constexpr):
    """(eps, xi, rbits) of the BLOCK elements of calls j for a restore + update pass: eps of
    ``restore_tag`` (NEED_EPS), xi of tag 32 (NEED_XI), zeros where not needed; with SR the
    rbits of its words (tag 0 and tag 32): the eps call (when EPS_TAG0) and the xi call are
    reused, a missing call is made for the rbits alone. One place for the per-tensor and the
    multi-tensor kernels."""
    eps = tl.zeros([BLOCK], tl.float32)
    xi = tl.zeros([BLOCK], tl.float32)
    rbits = tl.zeros([BLOCK], tl.uint32)
    if SR:
        if NEED_EPS:
            if EPS_TAG0:
                eps, w0 = block_normals_words(key, bw, j, step_lo, restore_tag)
            else:
                eps = block_normals(key, bw, j, step_lo, restore_tag)
                w0 = block_words(key, bw, j, step_lo, 0)
        else:
            w0 = block_words(key, bw, j, step_lo, 0)
        if NEED_XI:
            xi, w32 = block_normals_words(key, bw, j, step_lo, TAG_XI)
        else:
            w32 = block_words(key, bw, j, step_lo, TAG_XI)
        rbits = sr_bits_of(w0, w32)
    else:
        if NEED_EPS:
            eps = block_normals(key, bw, j, step_lo, restore_tag)
        if NEED_XI:
            xi = block_normals(key, bw, j, step_lo, TAG_XI)
    return eps, xi, rbits


@triton.jit
def rne_bf16(x):
    """fp32 -> bf16 round-to-nearest-even by bit manipulation (NaN -> 0x7FC0), as bf16
    tensor: exact under TRITON_INTERPRET=1 too, whose .to(bfloat16) truncates."""
    u = x.to(tl.uint32, bitcast=True)
    h = (u + (((u >> 16) & 1) + 0x7FFF)) >> 16
    h = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, h)
    return h.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def stochastic_round_bits(x, rbits, IS_BF16: tl.constexpr):
    """uint16 bit patterns of SR(x) (fp32 x, uint32 rbits in [0, 2^16)): elementwise.h's
    sr_bf16_bits / sr_fp16_bits, integer operations only (the definition is in
    fused_flat.noise.stochastic_round). Store with ``.to(dtype, bitcast=True)``."""
    u = x.to(tl.uint32, bitcast=True)
    r = rbits.to(tl.uint32) & 0xFFFF
    if IS_BF16:
        nonfinite = (u & 0x7F800000) == 0x7F800000
        nan = nonfinite & ((u & 0x007FFFFF) != 0)
        h = tl.where(nonfinite, u >> 16, (u + r) >> 16)
        h = tl.where(nan, 0x7FC0, h)
    else:
        sign = (u >> 16) & 0x8000
        m = u & 0x7FFFFFFF
        e = m >> 23
        sig = tl.where(e > 0, (m & 0x007FFFFF) | 0x00800000, m).to(tl.uint64)
        shift = tl.where(e >= 113, 13, tl.where(e == 0, 125, 126 - e))
        s = tl.minimum(shift, 40).to(tl.uint64)
        k = sig >> s
        one = tl.full(sig.shape, 1, tl.uint64)
        d = ((sig & ((one << s) - 1)) << 16) >> s
        up = ((r.to(tl.uint64) + d) >> 16).to(tl.uint32)
        h = tl.where(e >= 113, (e - 113) << 10, 0) + k.to(tl.uint32) + up
        h = tl.minimum(h, 0x7C00)
        nan = (e == 0xFF) & ((m & 0x007FFFFF) != 0)
        h = tl.where(e == 0xFF, 0x7C00, h)
        h = tl.where(nan, 0x7E00, sign | h)
    return h.to(tl.uint16)


# ------------------------------------------------------------------ inspection kernels
@triton.jit
def _words_kernel(out_ptr, key, bw, step_lo, tag, first_call, n_calls, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    k = pid * BLOCK + tl.arange(0, BLOCK)
    mask = k < n_calls
    x0, x1, x2, x3 = call_words(key, bw, first_call + k, step_lo, tag)
    tl.store(out_ptr + 4 * k + 0, x0.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * k + 1, x1.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * k + 2, x2.to(tl.int64), mask=mask)
    tl.store(out_ptr + 4 * k + 3, x3.to(tl.int64), mask=mask)


@triton.jit
def _normal_kernel(z_ptr, w_ptr, key, bw, step_lo, tag, offset, n, MIS: tl.constexpr,
                   BLOCK: tl.constexpr):
    # Same indexing as the update kernels: program p covers calls (offset >> 2) + p*Q + k,
    # i.e. the local elements p * BLOCK - MIS + [0, BLOCK), MIS = offset & 3.
    Q: tl.constexpr = BLOCK // 4
    pid = tl.program_id(0).to(tl.int64)
    j = (offset >> 2) + pid * Q + tl.arange(0, Q)
    local = pid * BLOCK + tl.arange(0, BLOCK) - MIS
    mask = (local >= 0) & (local < n)
    tl.store(z_ptr + local, block_normals(key, bw, j, step_lo, tag), mask=mask)
    tl.store(w_ptr + local, block_words(key, bw, j, step_lo, tag).to(tl.int64), mask=mask)


def philox_words(seed: int, bucket_id: int, step: int, tag: int, first_call: int, n_calls: int,
                 device="cpu", block: int = 1024) -> torch.Tensor:
    """Words of calls [first_call, first_call + n_calls) as int64 [n_calls, 4] (as fused_flat.noise)."""
    out = torch.empty((n_calls, 4), dtype=torch.int64, device=device)
    key, bw = noise_key(seed, bucket_id, tag)
    if n_calls:
        first = first_call - 2 ** 64 if first_call >= 2 ** 63 else first_call
        _words_kernel[(triton.cdiv(n_calls, block),)](
            out, key, bw, step & MASK32, tag, first, n_calls, BLOCK=block)
    return out


def normal_noise_and_words(seed: int, bucket_id: int, step: int, tag: int, offset: int, n: int,
                           device="cpu", block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(z(tag, i) float32, w(tag, i) int64) of bucket elements [offset, offset + n)."""
    z = torch.empty(n, dtype=torch.float32, device=device)
    w = torch.empty(n, dtype=torch.int64, device=device)
    key, bw = noise_key(seed, bucket_id, tag)
    if n:
        mis = offset & 3
        _normal_kernel[(triton.cdiv(n + mis, block),)](
            z, w, key, bw, step & MASK32, tag, offset, n, MIS=mis, BLOCK=block)
    return z, w


def normal_noise(seed: int, bucket_id: int, step: int, tag: int, offset: int, n: int,
                 device="cpu", block: int = 1024) -> torch.Tensor:
    """z(tag, i) of bucket elements [offset, offset + n), float32 (as fused_flat.noise)."""
    return normal_noise_and_words(seed, bucket_id, step, tag, offset, n, device, block)[0]


def element_words(seed: int, bucket_id: int, step: int, tag: int, offset: int, n: int,
                  device="cpu", block: int = 1024) -> torch.Tensor:
    """w(tag, i) of bucket elements [offset, offset + n), int64 (as fused_flat.noise)."""
    return normal_noise_and_words(seed, bucket_id, step, tag, offset, n, device, block)[1]


def gaussian_noise(seed: int, bucket_id: int, step: int, tag: int, offset: int, n: int,
                   device="cpu", block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(z(tag, i), z(32, i)) of bucket elements [offset, offset + n) (as fused_flat.noise)."""
    return (normal_noise(seed, bucket_id, step, tag, offset, n, device, block),
            normal_noise(seed, bucket_id, step, 32, offset, n, device, block))


@triton.jit
def _sr_kernel(x_ptr, r_ptr, out_ptr, n, IS_BF16: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = o < n
    x = tl.load(x_ptr + o, mask=mask, other=0.0)
    r = tl.load(r_ptr + o, mask=mask, other=0).to(tl.uint32)
    h = stochastic_round_bits(x, r, IS_BF16)
    tl.store(out_ptr + o, h.to(out_ptr.dtype.element_ty, bitcast=True), mask=mask)


def stochastic_round(x: torch.Tensor, rbits: torch.Tensor, dtype: torch.dtype,
                     block: int = 1024) -> torch.Tensor:
    """SR of float32 ``x`` to bf16 / fp16 with int ``rbits`` by the Triton helper (tests)."""
    x = x.to(torch.float32).contiguous()
    r = rbits.to(torch.int32).contiguous()
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    if x.numel():
        _sr_kernel[(triton.cdiv(x.numel(), block),)](x, r, out, x.numel(),
                                                     IS_BF16=dtype == torch.bfloat16, BLOCK=block)
    return out


def sr_bits(seed: int, bucket_id: int, step: int, offset: int, n: int, device="cpu",
            block: int = 1024) -> torch.Tensor:
    """rbits of bucket elements [offset, offset + n), int64 (as fused_flat.noise.sr_bits)."""
    w0 = element_words(seed, bucket_id, step, 0, offset, n, device, block)
    w32 = element_words(seed, bucket_id, step, 32, offset, n, device, block)
    return (w0 & 0xFF) | ((w32 & 0xFF) << 8)
