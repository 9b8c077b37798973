"""The SAM-family passes as multi-tensor Triton kernels: one launch per bucket per pass.

List ops with the Backend list signatures of the SAM family (fused_flat/backends/__init__.py:
``sam_grad_sq_norm``, ``sam_perturb_``, ``sam_restore_and_step_``, ``sam_probe_``); each list
holds 1-D contiguous tensors of one dtype and device, with the same numels across the lists
of one call. The per-element math is csrc/include/fused_flat/sam_elementwise.h, and
fused_flat/backends/sam_reference.py is the oracle.

Each is ONE registered torch op (opaque; namespace ``fused_flat_triton``:
``sam_grad_sq_norm_list``, ``sam_perturb_list_``, ``sam_restore_and_step_list_``,
``sam_probe_list_``; its arguments are the fields of the pass's bundle in
fused_flat.backends._args, fused_flat.backends.multi_tensor.register_list_op), called by these
Python entry points after the argument checks of fused_flat.backends._args (metadata only); as in fused_flat/backends/triton/multi.py the real
implementation builds one launch's tables (fused_flat.backends.multi_tensor.launch_tables: pinned
staging, non-blocking copy, capture-owned while a CUDA graph is captured) and launches once,
and the fake implementation touches nothing on the host (no host read on fake tensors, one
node per pass under torch.compile). Fake tensors therefore never run the table building:
tests/test_gpu_sync.py checks it on a GPU (``make gpu-check``).

Launch: one launch's tables from fused_flat.backends.multi_tensor. Program b reads its row (t, start) of the
chunk table, tensor t's numel / bucket offset from the tensor table and its data pointers
from the pointer table (``int64 -> pointer`` casts), then walks ``CHUNK`` elements in
``BLOCK`` steps: whole blocks unmasked, the last one masked. ``coef`` may be a Python
float or a 1-element device tensor (read in the kernel: the global norm never leaves the
device); ``grad_scale`` / ``found_inf`` are read in the kernel too. The squared norm is a
two-stage deterministic reduction: one float64 partial per chunk, then ``partials.sum()``
on the device (no host sync, no atomics: the same bits on every run).

Device-resident per-step scalars (CUDA-graph capture), as in fused_flat/backends/triton/multi.py:
``sam_restore_and_step_``'s ``lr`` may be a one-element float64 (or float32) tensor on the
device (loaded, rounded to fp32 RNE: the bits of ``float(lr)``) and its ``step`` (the SR
bits) a one-element int64 tensor (its low 32 bits, as ``step & MASK32``); ``sam_probe_``'s
``step`` likewise. Constexprs LR_PTR / STEP_PTR select the loads, a dummy pointer stands in
when unused, so the Python-scalar path is unchanged; no host read of the tensors (a
ValueError names what to pass).

Math in fp32 for fp32/bf16/fp16 (common.DTYPES); fp64 lists are not taken (ValueError):
fused_flat.backends.resolve gives fp64 buckets to a backend with fp64 arithmetic. Devices:
CUDA, and CPU under TRITON_INTERPRET=1.

RW-SAM's probe sign is fused_flat/backends/triton/noise.py's ``rademacher``: the top bit of
w(16, i) = x_(i & 3) of Philox call j = i >> 2 (noise-stream layout 3, ALGORITHMS.md §1);
the stochastic-rounding bits are its ``sr_bits_of`` of the tag-0 and tag-32 words.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from fused_flat.backends import _args
from fused_flat.backends import multi_tensor as mt
from fused_flat.backends.triton.common import (DTYPES, grad_mult_and_skip, launch, ld,
                                               load_f32, load_step_lo, st)
from fused_flat.backends.triton.noise import (MASK32, block_words, index_words, noise_key,
                                              rademacher, sr_bits_of, stochastic_round_bits)

BLOCK = 1024
CHUNK = 16 * BLOCK      # elements per program (a multiple of BLOCK); tests may lower it
NUM_WARPS = 4

_NO_SPEC = ["T", "eta"]


# ------------------------------------------------------------------ table access
@triton.jit
def _row(chunks_ptr, meta_ptr, CHUNK: tl.constexpr):
    """(tensor t, first element s, elements end = min(numel_t - s, CHUNK), bucket offset of t)."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.load(chunks_ptr + 2 * b)
    s = tl.load(chunks_ptr + 2 * b + 1)
    n = tl.load(meta_ptr + 2 * t)
    off = tl.load(meta_ptr + 2 * t + 1)
    return t, s, tl.minimum(n - s, CHUNK), off


@triton.jit
def _ptr(ptrs_ptr, k, T, t, carrier, ALIGNED: tl.constexpr):
    """Pointer of list k, tensor t, typed like ``carrier``; 16-byte aligned when ALIGNED."""
    p = tl.load(ptrs_ptr + k * T + t).to(tl.pointer_type(carrier.dtype.element_ty))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _row3(chunks_ptr, meta_ptr, ptrs_ptr, T, carrier, ALIGNED: tl.constexpr, CHUNK: tl.constexpr):
    """_row, and the pointers of lists 0, 1 and 2 of tensor t."""
    t, s, end, off = _row(chunks_ptr, meta_ptr, CHUNK)
    return (t, s, end, off, _ptr(ptrs_ptr, 0, T, t, carrier, ALIGNED),
            _ptr(ptrs_ptr, 1, T, t, carrier, ALIGNED), _ptr(ptrs_ptr, 2, T, t, carrier, ALIGNED))


@triton.jit
def _offs(s, it, BLOCK: tl.constexpr):
    o = s + it + tl.arange(0, BLOCK)
    return tl.max_contiguous(tl.multiple_of(o, 16), BLOCK)


# ------------------------------------------------------------------ kernels
@triton.jit
def _sq_block(g_ptr, p_ptr, o, mask, eta, ADAPTIVE: tl.constexpr, MASKED: tl.constexpr):
    g = ld(g_ptr, o, mask, MASKED).to(tl.float32).to(tl.float64)
    if ADAPTIVE:
        th = ld(p_ptr, o, mask, MASKED).to(tl.float32)
        t = (tl.abs(th) + eta).to(tl.float64) * g
    else:
        t = g
    return t * t


@triton.jit(do_not_specialize=_NO_SPEC)
def sq_norm_kernel(chunks_ptr, meta_ptr, ptrs_ptr, T, partial_ptr, carrier, eta,
                   ADAPTIVE: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
                   BLOCK: tl.constexpr):
    t, s, end, _off = _row(chunks_ptr, meta_ptr, CHUNK)
    g_ptr = _ptr(ptrs_ptr, 0, T, t, carrier, ALIGNED)
    p_ptr = g_ptr
    if ADAPTIVE:
        p_ptr = _ptr(ptrs_ptr, 1, T, t, carrier, ALIGNED)
    acc = tl.zeros([BLOCK], tl.float64)
    nfull = (end // BLOCK) * BLOCK
    for it in range(0, nfull, BLOCK):
        acc += _sq_block(g_ptr, p_ptr, _offs(s, it, BLOCK), None, eta, ADAPTIVE, False)
    if nfull < end:
        o = _offs(s, nfull, BLOCK)
        acc += _sq_block(g_ptr, p_ptr, o, o < s + end, eta, ADAPTIVE, True)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(acc, axis=0))


@triton.jit
def _perturb_block(p_ptr, g_ptr, b_ptr, o, mask, coef, eta, ADAPTIVE: tl.constexpr,
                   MASKED: tl.constexpr):
    x = ld(p_ptr, o, mask, MASKED)
    st(b_ptr, o, x, mask, MASKED)
    th = x.to(tl.float32)
    g = ld(g_ptr, o, mask, MASKED).to(tl.float32)
    if ADAPTIVE:
        t = tl.abs(th) + eta
        new = th + (coef * (t * t)) * g
    else:
        new = th + coef * g
    st(p_ptr, o, new.to(p_ptr.dtype.element_ty), mask, MASKED)


@triton.jit(do_not_specialize=_NO_SPEC + ["coef"])
def perturb_kernel(chunks_ptr, meta_ptr, ptrs_ptr, T, carrier, coef_ptr, coef, eta,
                   ADAPTIVE: tl.constexpr, COEF_PTR: tl.constexpr, ALIGNED: tl.constexpr,
                   CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, s, end, _off, p_ptr, g_ptr, b_ptr = _row3(chunks_ptr, meta_ptr, ptrs_ptr, T, carrier,
                                                  ALIGNED, CHUNK)
    c = coef
    if COEF_PTR:
        c = tl.load(coef_ptr).to(tl.float32)
    nfull = (end // BLOCK) * BLOCK
    for it in range(0, nfull, BLOCK):
        _perturb_block(p_ptr, g_ptr, b_ptr, _offs(s, it, BLOCK), None, c, eta, ADAPTIVE, False)
    if nfull < end:
        o = _offs(s, nfull, BLOCK)
        _perturb_block(p_ptr, g_ptr, b_ptr, o, o < s + end, c, eta, ADAPTIVE, True)


@triton.jit
def _sr_rbits(key, bw, step_lo, gi0, o, OFF4: tl.constexpr, BLOCK: tl.constexpr):
    """rbits of bucket indices gi0 + [0, BLOCK) (o: the same elements' tensor indices).
    OFF4 (gi0 % 4 == 0): one tag-0 and one tag-32 call per 4 elements; else per element."""
    if OFF4:
        j = (gi0 >> 2) + tl.arange(0, BLOCK // 4)
        rb = sr_bits_of(block_words(key, bw, j, step_lo, 0), block_words(key, bw, j, step_lo, 32))
    else:
        gi = gi0 + tl.arange(0, BLOCK).to(tl.int64)
        rb = sr_bits_of(index_words(key, bw, gi, step_lo, 0), index_words(key, bw, gi, step_lo, 32))
    return rb


@triton.jit
def _step_block(p_ptr, b_ptr, g_ptr, m_ptr, o, mask, skip, mult, lr, weight_decay, momentum,
                dampening, momentum_init, HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr,
                MASKED: tl.constexpr, key=0, bw=0, step_lo=0, gi0=0, SR: tl.constexpr = False,
                IS_BF16: tl.constexpr = False, OFF4: tl.constexpr = False,
                BLOCK: tl.constexpr = 1024):
    theta = ld(b_ptr, o, mask, MASKED).to(tl.float32)
    g = ld(g_ptr, o, mask, MASKED).to(tl.float32)
    d = g * mult
    d = d + weight_decay * theta
    if HAS_MOM:
        m = ld(m_ptr, o, mask, MASKED).to(tl.float32)
        buf = tl.where(momentum_init != 0, d, momentum * m + (1.0 - dampening) * d)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
        buf = tl.where(skip, m, buf)            # skipped step: momentum untouched
        st(m_ptr, o, buf.to(m_ptr.dtype.element_ty), mask, MASKED)
    new = tl.where(skip, theta, theta - lr * d)  # skipped step: exact restore only
    if SR:   # SR of an exactly representable value (the skipped step's backup) is exact
        rb = _sr_rbits(key, bw, step_lo, gi0, o, OFF4, BLOCK)
        out = stochastic_round_bits(new, rb, IS_BF16).to(p_ptr.dtype.element_ty, bitcast=True)
    else:
        out = new.to(p_ptr.dtype.element_ty)
    st(p_ptr, o, out, mask, MASKED)


@triton.jit(do_not_specialize=_NO_SPEC + ["lr", "weight_decay", "momentum", "dampening",
                                          "grad_mult", "momentum_init", "key", "bw",
                                          "step_lo"])
def restore_and_step_kernel(chunks_ptr, meta_ptr, ptrs_ptr, T, carrier, grad_scale_ptr,
                            found_inf_ptr, lr_ptr, step_ptr, lr, weight_decay, momentum,
                            dampening, grad_mult, momentum_init, HAS_MOM: tl.constexpr,
                            NESTEROV: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                            HAS_FOUND_INF: tl.constexpr, ALIGNED: tl.constexpr,
                            CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                            key=0, bw=0, step_lo=0, SR: tl.constexpr = False,
                            IS_BF16: tl.constexpr = False, OFF4: tl.constexpr = False,
                            LR_PTR: tl.constexpr = False, STEP_PTR: tl.constexpr = False):
    t, s, end, _off, p_ptr, b_ptr, g_ptr = _row3(chunks_ptr, meta_ptr, ptrs_ptr, T, carrier,
                                                  ALIGNED, CHUNK)
    m_ptr = p_ptr
    if HAS_MOM:
        m_ptr = _ptr(ptrs_ptr, 3, T, t, carrier, ALIGNED)
    lr = load_f32(lr_ptr, lr, LR_PTR)
    if SR:
        step_lo = load_step_lo(step_ptr, step_lo, STEP_PTR)
    mult, skip = grad_mult_and_skip(grad_mult, grad_scale_ptr, found_inf_ptr, HAS_GRAD_SCALE,
                                    HAS_FOUND_INF)
    nfull = (end // BLOCK) * BLOCK
    for it in range(0, nfull, BLOCK):
        _step_block(p_ptr, b_ptr, g_ptr, m_ptr, _offs(s, it, BLOCK), None, skip, mult, lr,
                    weight_decay, momentum, dampening, momentum_init, HAS_MOM, NESTEROV, False,
                    key, bw, step_lo, _off + s + it, SR, IS_BF16, OFF4, BLOCK)
    if nfull < end:
        o = _offs(s, nfull, BLOCK)
        _step_block(p_ptr, b_ptr, g_ptr, m_ptr, o, o < s + end, skip, mult, lr, weight_decay,
                    momentum, dampening, momentum_init, HAS_MOM, NESTEROV, True,
                    key, bw, step_lo, _off + s + nfull, SR, IS_BF16, OFF4, BLOCK)


@triton.jit
def _probe_block(p_ptr, b_ptr, o, mask, off, key, bw, step_lo, delta, MASKED: tl.constexpr):
    x = ld(p_ptr, o, mask, MASKED)
    st(b_ptr, o, x, mask, MASKED)
    v = rademacher(key, bw, off + o, step_lo)
    new = x.to(tl.float32) + delta * v
    st(p_ptr, o, new.to(p_ptr.dtype.element_ty), mask, MASKED)


@triton.jit(do_not_specialize=_NO_SPEC + ["key", "bw", "step_lo", "delta"])
def probe_kernel(chunks_ptr, meta_ptr, ptrs_ptr, T, carrier, step_ptr, key, bw, step_lo, delta,
                 ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                 STEP_PTR: tl.constexpr = False):
    t, s, end, off = _row(chunks_ptr, meta_ptr, CHUNK)
    p_ptr = _ptr(ptrs_ptr, 0, T, t, carrier, ALIGNED)
    b_ptr = _ptr(ptrs_ptr, 1, T, t, carrier, ALIGNED)
    step_lo = load_step_lo(step_ptr, step_lo, STEP_PTR)
    nfull = (end // BLOCK) * BLOCK
    for it in range(0, nfull, BLOCK):
        _probe_block(p_ptr, b_ptr, _offs(s, it, BLOCK), None, off, key, bw, step_lo, delta, False)
    if nfull < end:
        o = _offs(s, nfull, BLOCK)
        _probe_block(p_ptr, b_ptr, o, o < s + end, off, key, bw, step_lo, delta, True)


# ------------------------------------------------------------------ launch tables
def _launch_args(lists, offsets=None):
    """One launch's tables (fused_flat.backends.multi_tensor.launch_tables) and the launch constexprs
    (ALIGNED: every data pointer 16-byte aligned, fused_flat.backends.multi_tensor.Tables.aligned16).
    Runs inside the ops' real implementations only (it reads data pointers)."""
    tb = mt.launch_tables(lists, CHUNK, offsets)
    return tb, dict(ALIGNED=tb.aligned16, CHUNK=CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS)


# ------------------------------------------------------------------ the registered ops
# One torch op per pass (fused_flat.backends.multi_tensor.register_list_op), as fused_flat/backends/triton/multi.py:
# the real implementation builds the tables and launches once; the fake implementation
# touches nothing on the host (no host read on fake tensors, one node per pass in a
# compiled graph). The table building runs only in the real implementation:
# tests/test_gpu_sync.py checks it on a GPU (``make gpu-check``).
_LIB = torch.library.Library("fused_flat_triton", "FRAGMENT")   # shared with triton/multi.py


def _sq_norm_list(a: _args.SamSqNorm) -> torch.Tensor:
    """ASAM's (|theta| + eta) g when ``params`` is not empty, else g."""
    device = a.grads[0].device
    adaptive = len(a.params) > 0
    with mt.launching(device):
        tb, kw = _launch_args([a.grads] + ([a.params] if adaptive else []))
        if tb.n_chunks == 0:
            return torch.zeros((), dtype=torch.float64, device=device)
        partial = torch.empty(tb.n_chunks, dtype=torch.float64, device=device)
        sq_norm_kernel[(tb.n_chunks,)](tb.chunks, tb.meta, tb.ptrs, tb.n_tensors, partial,
                                       a.grads[0], a.eta, ADAPTIVE=adaptive, **kw)
        return partial.sum()


def _sq_norm_list_fake(a: _args.SamSqNorm):
    return a.grads[0].new_empty((), dtype=torch.float64)


SQ_NORM_LIST = _args.register(_LIB, "sam_grad_sq_norm_list", _args.SamSqNorm, _sq_norm_list,
                              _sq_norm_list_fake, returns="Tensor")


def _perturb_list(a: _args.SamPerturb) -> None:
    launch(perturb_kernel, _launch_args, [a.params, a.grads, a.backups], None,
           a.coef_t if a.coef_t is not None else a.params[0], a.coef, a.eta,
           ADAPTIVE=a.adaptive, COEF_PTR=a.coef_t is not None)


PERTURB_LIST = _args.register(_LIB, "sam_perturb_list_", _args.SamPerturb, _perturb_list)


def _restore_and_step_list(a: _args.SamRestoreAndStep) -> None:
    """``stochastic_rounding``: that of 16-bit params, with the rbits at the bucket indices
    ``offsets`` (None: the packed prefix sums of the numels)."""
    ref = a.params[0]
    has_mom = len(a.moms) > 0
    sr = a.stochastic_rounding
    key, bw = noise_key(a.seed, a.bucket_id) if sr else (0, 0)
    off4 = sr and (all(o % 4 == 0 for o in a.offsets) if a.offsets is not None
                   else all(t.numel() % 4 == 0 for t in a.params[:-1]))
    launch(restore_and_step_kernel, _launch_args,
           [a.params, a.backups, a.grads] + ([a.moms] if has_mom else []),
           a.offsets if sr else None,
           a.grad_scale if a.grad_scale is not None else ref,
           a.found_inf if a.found_inf is not None else ref,
           a.lr_t if a.lr_t is not None else ref, a.step_t if a.step_t is not None else ref,
           a.lr, a.weight_decay, a.momentum, a.dampening, a.grad_mult, int(a.momentum_init),
           HAS_MOM=has_mom, NESTEROV=a.nesterov and has_mom,
           HAS_GRAD_SCALE=a.grad_scale is not None, HAS_FOUND_INF=a.found_inf is not None,
           key=key, bw=bw, step_lo=a.step & MASK32 if sr else 0,
           SR=sr, IS_BF16=ref.dtype == torch.bfloat16, OFF4=off4, LR_PTR=a.lr_t is not None,
           STEP_PTR=sr and a.step_t is not None)


RESTORE_AND_STEP_LIST = _args.register(_LIB, "sam_restore_and_step_list_",
                                       _args.SamRestoreAndStep, _restore_and_step_list)


def _probe_list(a: _args.SamProbe) -> None:
    key, bw = noise_key(a.seed, a.bucket_id)
    launch(probe_kernel, _launch_args, [a.params, a.backups], a.offsets,
           a.step_t if a.step_t is not None else a.params[0], key, bw, a.step & MASK32, a.delta,
           STEP_PTR=a.step_t is not None)


PROBE_LIST = _args.register(_LIB, "sam_probe_list_", _args.SamProbe, _probe_list)


# ------------------------------------------------------------------ entry points
def sam_grad_sq_norm(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor] | None,
                     eta: float) -> torch.Tensor:
    """sum_i t_i^2 over every element of every tensor, float64 0-dim on the device;
    t = g, or (|theta| + eta) * g when ``params`` is given (ASAM). One call of the op
    ``fused_flat_triton::sam_grad_sq_norm_list``."""
    a = _args.sam_sq_norm("fused_flat.backends.triton.sam_grad_sq_norm", grads, params, eta,
                          DTYPES)
    if a is None:
        return torch.zeros((), dtype=torch.float64)
    return SQ_NORM_LIST(*a)


def sam_perturb_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                 backups: Sequence[torch.Tensor], adaptive: bool, coef: float | torch.Tensor,
                 eta: float) -> None:
    """backup <- theta ; theta <- theta + (coef * s) * g, s = (|theta| + eta)^2 if adaptive
    else 1. ``coef``: a float or a 1-element tensor on the device (read in the kernel).
    One call of the op ``fused_flat_triton::sam_perturb_list_``."""
    a = _args.sam_perturb("fused_flat.backends.triton.sam_perturb_", params, grads, backups,
                          adaptive, coef, eta, DTYPES)
    if a is not None:
        PERTURB_LIST(*a)


def sam_restore_and_step_(params: Sequence[torch.Tensor], backups: Sequence[torch.Tensor],
                          grads: Sequence[torch.Tensor], moms: Sequence[torch.Tensor] | None,
                          grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
                          lr: float | torch.Tensor, weight_decay: float, momentum: float,
                          dampening: float, nesterov: bool, momentum_init: bool,
                          grad_mult: float, stochastic_rounding: bool = False, seed: int = 0,
                          bucket_id: int = 0, step: int | torch.Tensor = 0,
                          offsets: Sequence[int] | None = None) -> None:
    """theta <- backup, then torch.optim.SGD's update with g2 (fused_flat.backends.sam_reference);
    a set ``found_inf`` only restores (momentum untouched). No host sync: one call of the op
    ``fused_flat_triton::sam_restore_and_step_list_``.

    ``stochastic_rounding`` (bf16/fp16 lists; ignored otherwise): theta is stored as
    SR(theta) with the rbits (tags 0 and 32 of seed, bucket_id, step) of bucket index
    offsets[t] + e; ``offsets`` default to the packed prefix sums of the numels.

    ``lr``: a float or a one-element float64/float32 tensor on the device; ``step``: an int or
    a one-element int64 tensor on the device (module docstring: device scalars)."""
    a = _args.sam_restore_and_step(
        "fused_flat.backends.triton.sam_restore_and_step_", params, backups, grads, moms,
        grad_scale, found_inf, lr, weight_decay, momentum, dampening, nesterov, momentum_init,
        grad_mult, stochastic_rounding, seed, bucket_id, step, offsets, DTYPES)
    if a is not None:
        RESTORE_AND_STEP_LIST(*a)


def sam_probe_(params: Sequence[torch.Tensor], backups: Sequence[torch.Tensor],
               offsets: Sequence[int], seed: int, bucket_id: int, step: int | torch.Tensor,
               delta: float) -> None:
    """backup <- theta ; theta <- theta + delta * v, v the Rademacher probe of tag 16
    (layout 3) at bucket index offsets[t] + e of element e of tensor t. ``step``: an int or
    a one-element int64 tensor on the device (read by the kernel). One call of the op
    ``fused_flat_triton::sam_probe_list_``."""
    a = _args.sam_probe("fused_flat.backends.triton.sam_probe_", params, backups, offsets, seed,
                        bucket_id, step, delta, DTYPES)
    if a is not None:
        PROBE_LIST(*a)
