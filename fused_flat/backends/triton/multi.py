"""The Langevin passes (perturb, restore + update, the perturbation from fp32 masters) and the
finiteness check as multi-tensor Triton kernels: one launch per bucket per pass (issue 12).

List ops with the Backend list signatures of the Langevin family
(fused_flat/backends/__init__.py: ``perturb_``, ``perturb_from_``, ``restore_and_step_`` with
``stochastic_rounding=False``, ``all_finite(tensors) -> float32 [1]`` on the device, 1.0 if
any element is inf or NaN); each list holds 1-D contiguous tensors of one dtype (fp32, bf16
or fp16: common.DTYPES) and device, and the lists of one call have equal numels.

Each is ONE registered torch op (opaque; namespace ``fused_flat_triton``: ``perturb_list_``,
``perturb_from_list_``, ``restore_and_step_list_``, ``all_finite_list``; its arguments are
the fields of the pass's bundle in fused_flat.backends._args, defined by
fused_flat.backends.multi_tensor.register_list_op: Library.define + impl + register_fake, whose
dispatch costs less than half of torch.library.custom_op's per tensor) called by these Python
entry points after the argument checks of fused_flat.backends._args (metadata only). The op's real implementation builds
the launch tables (fused_flat.backends.multi_tensor.launch_tables: pinned staging buffer, non-blocking
copy, tables owned by the call or, while a CUDA graph is being captured, by the process) and
launches the kernel once; its fake implementation touches
nothing on the host. So on fake tensors (FakeTensorMode, torch.compile's tracing) a step
makes no host read and a compiled step holds one node per pass -- and, for the same reason,
fake tensors never run the table-building code: tests/test_gpu_sync.py checks it on a GPU
(``make gpu-check``, torch.cuda.set_sync_debug_mode("error"), a CUDA graph captured on the
first step).

Math and noise: fused_flat.backends.reference's per element (ALGORITHMS.md §2, elementwise.h's
langevin_update, in fp32), on the helpers of fused_flat/backends/triton/noise.py (noise
layout 3): element e of tensor t has bucket index i = offsets[t] + e; one Philox call
j = i >> 2 serves 4 elements of one tag.

Launch (one launch's tables from fused_flat.backends.multi_tensor, as fused_flat/backends/triton/sam.py): program b
reads row (t, s) of the chunk table and works in tensor t's *call frame*: frame position
f = e + mis, mis = offsets[t] & 3, so that frame position f has bucket index
4 * (offsets[t] >> 2) + f and a block of BLOCK frame positions starting at a multiple of
BLOCK is exactly BLOCK / 4 whole Philox calls (a shift by mis, per tensor at run time). The chunk and tensor tables are therefore built for the frame sizes
``numel_t + mis_t`` (meta row (numel_t + mis_t, offset_t)); the data pointers are shifted by
-mis_t elements in the kernel. Blocks that lie wholly inside the tensor take an unmasked
path (16-byte accesses when ALIGNED: every shifted pointer 16-byte aligned, checked on the
host; for the usual bucket, offsets are multiples of 4 and mis = 0); the tensor's first
block when mis > 0 and the chunk's last partial block are masked.

``grad_scale`` / ``found_inf`` are read in the kernel (no host sync). fp64 lists are not
taken (ValueError): fused_flat.backends.resolve gives fp64 buckets to a backend with fp64
arithmetic.

``stochastic_rounding=True`` (bf16 / fp16 lists; ignored for fp32 / fp64): the same single
launch with the constexpr SR (IS_BF16 picks the rounding, EPS_TAG0 = restore_tag == 0): theta
is stored as the SR of its fp32 result with rbits = (w(0, i) & 0xFF) | ((w(32, i) & 0xFF) << 8)
(ALGORITHMS.md §1; noise.stochastic_round_bits): the words of the eps call (when
restore_tag == 0) and of the xi call come from the same Philox calls as eps / xi
(noise.step_noise), a missing tag-0 or tag-32 call is made for the rbits alone. A skipped step (found_inf) stores the restored
value round-to-nearest, and the momentum buffer is always round-to-nearest.

Device-resident per-step scalars (CUDA-graph capture: the optimizers' ``capturable=True``):

* ``step`` (every op that draws noise; the counter of the noise and of the SR bits) is an ``int`` or a
  one-element (0-dim or [1]) ``torch.int64`` tensor on the params' device; the kernel loads
  it and uses its low 32 bits, exactly the host's ``step & MASK32``.
* ``lr`` and ``noise_std`` (``restore_and_step_``) are Python floats or one-element
  ``torch.float64`` (or float32) tensors on the params' device; the kernel loads them and
  rounds to fp32 (RNE), bit for bit what the launcher does with ``float(value)``. A tensor
  ``noise_std`` always draws xi (NEED_XI: its value is not known on the host); pass the
  Python float 0.0 when there is no Langevin noise.

No host read of these tensors (metadata checks only: dtype, numel, device; a ValueError
says what to pass). Python scalars keep the scalar arguments (no extra loads): constexprs
STEP_PTR / LR_PTR / NOISE_STD_PTR pick the loads, and an unused pointer argument gets a
dummy (the first param), as for grad_scale / found_inf. The per-step ints (step_lo, tags,
momentum_init) are in ``do_not_specialize`` and floats never specialize, so a new step or
lr never recompiles (tests/test_triton_list_aot.py checks the binding).

``perturb_from_`` (``master_weights=True``): param <- round-to-nearest(master + sigma *
eps(tag)) with fp32 masters (a second pointer list, ``master_carrier`` its type), in the
frame layout of ``perturb_``; bf16 is rounded by bit manipulation (noise.rne_bf16), so the
interpreter gives the GPU's bits; sigma = 0 copies the masters, rounded.

``all_finite`` is one launch and no host sync: each program folds its chunk's flag into a
persistent int32 scratch pair (flag, programs done) with atomics; the last program to
finish writes the output and resets the pair to zero for the next call. One scratch per
(device, stream): calls on one stream are ordered, so they never share it concurrently.
"""
from __future__ import annotations

import functools
import operator
from typing import List, Sequence

import torch
import triton
import triton.language as tl

from fused_flat.backends import _args
from fused_flat.backends import multi_tensor as mt
from fused_flat.backends.triton.common import (DTYPES, grad_mult_and_skip, launch, ld,
                                               load_f32, load_step_lo, st)
from fused_flat.backends.triton.noise import (MASK32, block_normals, noise_key, rne_bf16,
                                              step_noise, stochastic_round_bits)

BLOCK = 1024
CHUNK = 16 * BLOCK      # frame positions per program (a multiple of BLOCK); tests may lower it
NUM_WARPS = 4

_NO_SPEC = ["T", "key", "bw", "step_lo"]


# ------------------------------------------------------------------ table access
@triton.jit
def _frame_row(chunks_ptr, meta_ptr, CHUNK: tl.constexpr):
    """Row b of the chunk table in tensor t's call frame: (t, first frame position s,
    frame positions in this chunk, numel n, mis = offset & 3, first call jb = offset >> 2)."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.load(chunks_ptr + 2 * b)
    s = tl.load(chunks_ptr + 2 * b + 1)
    nf = tl.load(meta_ptr + 2 * t)            # numel + mis
    off = tl.load(meta_ptr + 2 * t + 1)
    mis = off & 3
    return t, s, tl.minimum(nf - s, CHUNK), nf - mis, mis, off >> 2


@triton.jit
def _fptr(ptrs_ptr, k, T, t, mis, carrier, ALIGNED: tl.constexpr):
    """Pointer of list k, tensor t, shifted by -mis elements (frame position 0); 16-byte
    aligned when ALIGNED."""
    p = tl.load(ptrs_ptr + k * T + t).to(tl.pointer_type(carrier.dtype.element_ty)) - mis
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _fofs(f, BLOCK: tl.constexpr):
    o = f + tl.arange(0, BLOCK)
    return tl.max_contiguous(tl.multiple_of(o, 16), BLOCK)


@triton.jit
def _frame_mask(o, mis, n):
    """The frame positions o that hold elements of the tensor: mis <= o < n + mis, as one
    unsigned compare (two compares and an and cost the SR kernels a register spill on sm90)."""
    return (o - mis).to(tl.uint64) < n.to(tl.uint64)


@triton.jit
def _calls(jb, f, BLOCK: tl.constexpr):
    """Philox call indices of the BLOCK frame positions [f, f + BLOCK), f a multiple of 4."""
    return jb + (f >> 2) + tl.arange(0, BLOCK // 4)


# ------------------------------------------------------------------ perturb
@triton.jit
def _perturb_block(p_ptr, f, mis, n, jb, key, bw, step_lo, tag, sigma, BLOCK: tl.constexpr,
                   MASKED: tl.constexpr):
    o = _fofs(f, BLOCK)
    mask = _frame_mask(o, mis, n)
    theta = ld(p_ptr, o, mask, MASKED).to(tl.float32)
    eps = block_normals(key, bw, _calls(jb, f, BLOCK), step_lo, tag)
    theta = (theta + sigma * eps).to(p_ptr.dtype.element_ty)
    st(p_ptr, o, theta, mask, MASKED)


@triton.jit(do_not_specialize=_NO_SPEC + ["tag"])
def perturb_kernel(chunks_ptr, meta_ptr, ptrs_ptr, T, carrier, step_ptr, key, bw, step_lo, tag,
                   sigma, STEP_PTR: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
                   BLOCK: tl.constexpr):
    t, s, end, n, mis, jb = _frame_row(chunks_ptr, meta_ptr, CHUNK)
    p_ptr = _fptr(ptrs_ptr, 0, T, t, mis, carrier, ALIGNED)
    step_lo = load_step_lo(step_ptr, step_lo, STEP_PTR)
    head = (s == 0) & (mis > 0)          # the tensor's first block starts before element 0
    nfull = (end // BLOCK) * BLOCK
    lo = head.to(tl.int64) * BLOCK
    for it in range(lo, nfull, BLOCK):
        _perturb_block(p_ptr, s + it, mis, n, jb, key, bw, step_lo, tag, sigma, BLOCK, False)
    if head:
        _perturb_block(p_ptr, s, mis, n, jb, key, bw, step_lo, tag, sigma, BLOCK, True)
    if (nfull < end) & ((nfull > 0) | (s > 0) | (mis == 0)):   # the tail, unless it was the head
        _perturb_block(p_ptr, s + nfull, mis, n, jb, key, bw, step_lo, tag, sigma, BLOCK, True)


# ------------------------------------------------------------------ perturb from masters
@triton.jit
def _perturb_from_block(p_ptr, m_ptr, f, mis, n, jb, key, bw, step_lo, tag, sigma,
                        NEED_EPS: tl.constexpr, IS_BF16: tl.constexpr, BLOCK: tl.constexpr,
                        MASKED: tl.constexpr):
    o = _fofs(f, BLOCK)
    mask = _frame_mask(o, mis, n)
    theta = ld(m_ptr, o, mask, MASKED).to(tl.float32)
    if NEED_EPS:
        theta = theta + sigma * block_normals(key, bw, _calls(jb, f, BLOCK), step_lo, tag)
    if IS_BF16:
        out = rne_bf16(theta)
    else:
        out = theta.to(p_ptr.dtype.element_ty)
    st(p_ptr, o, out, mask, MASKED)


@triton.jit(do_not_specialize=_NO_SPEC + ["tag"])
def perturb_from_kernel(chunks_ptr, meta_ptr, ptrs_ptr, T, carrier, master_carrier, step_ptr,
                        key, bw, step_lo, tag, sigma, NEED_EPS: tl.constexpr,
                        IS_BF16: tl.constexpr, STEP_PTR: tl.constexpr, ALIGNED: tl.constexpr,
                        CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """param <- round-to-nearest(master + sigma * eps(tag)): list 0 the params (``carrier``'s
    dtype), list 1 the fp32 masters (``master_carrier``'s); perturb_kernel's frame layout."""
    t, s, end, n, mis, jb = _frame_row(chunks_ptr, meta_ptr, CHUNK)
    p_ptr = _fptr(ptrs_ptr, 0, T, t, mis, carrier, ALIGNED)
    m_ptr = _fptr(ptrs_ptr, 1, T, t, mis, master_carrier, ALIGNED)
    step_lo = load_step_lo(step_ptr, step_lo, STEP_PTR)
    head = (s == 0) & (mis > 0)
    nfull = (end // BLOCK) * BLOCK
    lo = head.to(tl.int64) * BLOCK
    for it in range(lo, nfull, BLOCK):
        _perturb_from_block(p_ptr, m_ptr, s + it, mis, n, jb, key, bw, step_lo, tag, sigma,
                            NEED_EPS, IS_BF16, BLOCK, False)
    if head:
        _perturb_from_block(p_ptr, m_ptr, s, mis, n, jb, key, bw, step_lo, tag, sigma,
                            NEED_EPS, IS_BF16, BLOCK, True)
    if (nfull < end) & ((nfull > 0) | (s > 0) | (mis == 0)):
        _perturb_from_block(p_ptr, m_ptr, s + nfull, mis, n, jb, key, bw, step_lo, tag, sigma,
                            NEED_EPS, IS_BF16, BLOCK, True)


# ------------------------------------------------------------------ restore + update
@triton.jit
def _step_block(p_ptr, g_ptr, m_ptr, f, mis, n, jb, key, bw, step_lo, restore_tag, skip, mult,
                sigma, lr, weight_decay, momentum, dampening, noise_std, momentum_init,
                HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr, NEED_EPS: tl.constexpr,
                NEED_XI: tl.constexpr, HAS_FOUND_INF: tl.constexpr, SR: tl.constexpr,
                EPS_TAG0: tl.constexpr, IS_BF16: tl.constexpr, BLOCK: tl.constexpr,
                MASKED: tl.constexpr):
    # the per-element math of fused_flat.backends.reference.restore_and_step_ in fp32
    o = _fofs(f, BLOCK)
    mask = _frame_mask(o, mis, n)
    theta = ld(p_ptr, o, mask, MASKED).to(tl.float32)
    g = ld(g_ptr, o, mask, MASKED).to(tl.float32)
    m = tl.zeros([BLOCK], tl.float32)
    if HAS_MOM:
        m = ld(m_ptr, o, mask, MASKED).to(tl.float32)
    j = _calls(jb, f, BLOCK)
    eps, xi, rbits = step_noise(key, bw, j, step_lo, restore_tag, NEED_EPS, NEED_XI, SR,
                                 EPS_TAG0, BLOCK)

    if NEED_EPS:
        theta = theta - sigma * eps                     # restore
    restored = theta
    d = g * mult
    d = d + weight_decay * theta
    if HAS_MOM:
        buf = tl.where(momentum_init != 0, d, momentum * m + (1.0 - dampening) * d)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
    theta = theta - lr * d
    if NEED_XI:
        theta = theta + noise_std * xi

    if SR:
        theta_out = stochastic_round_bits(theta, rbits, IS_BF16).to(p_ptr.dtype.element_ty,
                                                                   bitcast=True)
    else:
        theta_out = theta.to(p_ptr.dtype.element_ty)
    if HAS_FOUND_INF:
        # skipped step (non-finite gradient): only the restore, round-to-nearest (also
        # under SR), m untouched
        theta_out = tl.where(skip, restored.to(p_ptr.dtype.element_ty), theta_out)
        if HAS_MOM:
            buf = tl.where(skip, m, buf)
    st(p_ptr, o, theta_out, mask, MASKED)
    if HAS_MOM:
        st(m_ptr, o, buf.to(m_ptr.dtype.element_ty), mask, MASKED)


@triton.jit(do_not_specialize=_NO_SPEC + ["restore_tag", "momentum_init"])
def restore_and_step_kernel(chunks_ptr, meta_ptr, ptrs_ptr, T, carrier, grad_scale_ptr,
                            found_inf_ptr, step_ptr, lr_ptr, noise_std_ptr, key, bw, step_lo,
                            restore_tag, sigma, lr, weight_decay, momentum, dampening, noise_std,
                            grad_mult, momentum_init,
                            HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr,
                            NEED_EPS: tl.constexpr, NEED_XI: tl.constexpr,
                            HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                            STEP_PTR: tl.constexpr, LR_PTR: tl.constexpr,
                            NOISE_STD_PTR: tl.constexpr, SR: tl.constexpr,
                            EPS_TAG0: tl.constexpr, IS_BF16: tl.constexpr,
                            ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, s, end, n, mis, jb = _frame_row(chunks_ptr, meta_ptr, CHUNK)
    p_ptr = _fptr(ptrs_ptr, 0, T, t, mis, carrier, ALIGNED)
    g_ptr = _fptr(ptrs_ptr, 1, T, t, mis, carrier, ALIGNED)
    m_ptr = p_ptr
    if HAS_MOM:
        m_ptr = _fptr(ptrs_ptr, 2, T, t, mis, carrier, ALIGNED)
    step_lo = load_step_lo(step_ptr, step_lo, STEP_PTR)
    lr = load_f32(lr_ptr, lr, LR_PTR)
    noise_std = load_f32(noise_std_ptr, noise_std, NOISE_STD_PTR)
    mult, skip = grad_mult_and_skip(grad_mult, grad_scale_ptr, found_inf_ptr, HAS_GRAD_SCALE,
                                    HAS_FOUND_INF)
    head = (s == 0) & (mis > 0)
    nfull = (end // BLOCK) * BLOCK
    lo = head.to(tl.int64) * BLOCK
    for it in range(lo, nfull, BLOCK):
        _step_block(p_ptr, g_ptr, m_ptr, s + it, mis, n, jb, key, bw, step_lo, restore_tag, skip,
                    mult, sigma, lr, weight_decay, momentum, dampening, noise_std, momentum_init,
                    HAS_MOM, NESTEROV, NEED_EPS, NEED_XI, HAS_FOUND_INF, SR, EPS_TAG0, IS_BF16,
                    BLOCK, False)
    if head:
        _step_block(p_ptr, g_ptr, m_ptr, s, mis, n, jb, key, bw, step_lo, restore_tag, skip,
                    mult, sigma, lr, weight_decay, momentum, dampening, noise_std, momentum_init,
                    HAS_MOM, NESTEROV, NEED_EPS, NEED_XI, HAS_FOUND_INF, SR, EPS_TAG0, IS_BF16,
                    BLOCK, True)
    if (nfull < end) & ((nfull > 0) | (s > 0) | (mis == 0)):
        _step_block(p_ptr, g_ptr, m_ptr, s + nfull, mis, n, jb, key, bw, step_lo, restore_tag, skip,
                    mult, sigma, lr, weight_decay, momentum, dampening, noise_std, momentum_init,
                    HAS_MOM, NESTEROV, NEED_EPS, NEED_XI, HAS_FOUND_INF, SR, EPS_TAG0, IS_BF16,
                    BLOCK, True)


# ------------------------------------------------------------------ all_finite
@triton.jit
def _bad_block(p_ptr, o, mask, MASKED: tl.constexpr):
    """1 where the element is inf or NaN (fp32 bits: exponent all ones), else 0."""
    bits = ld(p_ptr, o, mask, MASKED).to(tl.float32).to(tl.uint32, bitcast=True)
    return ((bits & 0x7FFFFFFF) >= 0x7F800000).to(tl.int32)


@triton.jit(do_not_specialize=["T", "n_programs"])
def all_finite_kernel(chunks_ptr, meta_ptr, ptrs_ptr, T, carrier, scratch_ptr, out_ptr,
                      n_programs, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
                      BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.load(chunks_ptr + 2 * b)
    s = tl.load(chunks_ptr + 2 * b + 1)
    end = tl.minimum(tl.load(meta_ptr + 2 * t) - s, CHUNK)
    p_ptr = tl.load(ptrs_ptr + t).to(tl.pointer_type(carrier.dtype.element_ty))
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
    bad = tl.zeros([BLOCK], tl.int32)
    nfull = (end // BLOCK) * BLOCK
    for it in range(0, nfull, BLOCK):
        bad = bad | _bad_block(p_ptr, _fofs(s + it, BLOCK), None, False)
    if nfull < end:
        o = _fofs(s + nfull, BLOCK)
        bad = bad | _bad_block(p_ptr, o, o < s + end, True)
    tl.atomic_max(scratch_ptr, tl.max(bad, axis=0))          # acq_rel: before the count
    done = tl.atomic_add(scratch_ptr + 1, 1)
    if done == n_programs - 1:                                # the last program: publish, reset
        flag = tl.atomic_xchg(scratch_ptr, 0)
        tl.store(out_ptr, flag.to(tl.float32))
        tl.atomic_xchg(scratch_ptr + 1, 0)


# ------------------------------------------------------------------ launch tables
def _frame_tables(lists, offsets):
    """One launch's tables for the call frame (numel + (offset & 3) per tensor, 0 for empty
    tensors; fused_flat.backends.multi_tensor.launch_tables) and the launch constexprs. Runs inside
    the ops' real implementations only (it reads data pointers)."""
    ref = lists[0]
    tb = mt.launch_tables(lists, CHUNK, offsets, frame=True)
    # the usual bucket (every pointer aligned, every offset a multiple of 4: no frame shift)
    # is decided without a per-tensor loop; otherwise the exact rule, tensor by tensor
    aligned = tb.aligned16 and not functools.reduce(operator.or_, offsets, 0) & 3
    if not aligned:
        es = ref[0].element_size()
        aligned = all((t.data_ptr() - (int(o) & 3) * es) % 16 == 0
                      for lst in lists for t, o in zip(lst, offsets) if t.numel())
    return tb, dict(ALIGNED=aligned, CHUNK=CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS)


# ------------------------------------------------------------------ the registered ops
# One torch op per pass (fused_flat.backends.multi_tensor.register_list_op: Library.define + impl +
# register_fake; the schemas' Tensor(a!)[] mark the lists written): the real implementation
# builds the launch tables (pinned staging, non-blocking copy: fused_flat.backends.multi_tensor) and
# launches the kernel once; the fake implementation touches nothing on the host, so a step
# on fake tensors (FakeTensorMode, torch.compile's tracing) makes no host read and the
# compiled graph holds one node per pass. The table building itself runs only in the real
# implementation, which fake tensors cannot reach: tests/test_gpu_sync.py checks it on a
# GPU (``make gpu-check``) under torch.cuda.set_sync_debug_mode("error").
_LIB = torch.library.Library("fused_flat_triton", "FRAGMENT")   # shared with triton/sam.py


def _noise(a):
    """(key, bw, step_lo) of a bundle's noise arguments (noise.noise_key: host arithmetic on
    ints) and the step tensor's pointer (a dummy: the first param) when there is none."""
    key, bw = noise_key(a.seed, a.bucket_id)
    return key, bw, a.step & MASK32, a.step_t if a.step_t is not None else a.params[0]


def _perturb_list(a: _args.Perturb) -> None:
    key, bw, step_lo, step_ptr = _noise(a)
    launch(perturb_kernel, _frame_tables, [a.params], a.offsets, step_ptr, key, bw, step_lo,
           a.tag, a.sigma, STEP_PTR=a.step_t is not None)


PERTURB_LIST = _args.register(_LIB, "perturb_list_", _args.Perturb, _perturb_list)


def _perturb_from_list(a: _args.PerturbFrom) -> None:
    key, bw, step_lo, step_ptr = _noise(a)
    launch(perturb_from_kernel, _frame_tables, [a.params, a.masters], a.offsets, a.masters[0],
           step_ptr, key, bw, step_lo, a.tag, a.sigma, NEED_EPS=a.sigma != 0.0,
           IS_BF16=a.params[0].dtype == torch.bfloat16, STEP_PTR=a.step_t is not None)


PERTURB_FROM_LIST = _args.register(_LIB, "perturb_from_list_", _args.PerturbFrom,
                                   _perturb_from_list)


def _restore_and_step_list(a: _args.RestoreAndStep) -> None:
    ref = a.params[0]
    has_mom = len(a.moms) > 0
    key, bw, step_lo, step_ptr = _noise(a)
    restore_tag = max(a.restore_tag, 0)   # -1 (no restore) only comes with sigma = 0
    need_eps, sr = a.sigma != 0.0, a.stochastic_rounding
    launch(restore_and_step_kernel, _frame_tables,
           [a.params, a.grads] + ([a.moms] if has_mom else []), a.offsets,
           a.grad_scale if a.grad_scale is not None else ref,
           a.found_inf if a.found_inf is not None else ref, step_ptr,
           a.lr_t if a.lr_t is not None else ref,
           a.noise_std_t if a.noise_std_t is not None else ref,
           key, bw, step_lo, restore_tag, a.sigma, a.lr, a.weight_decay, a.momentum,
           a.dampening, a.noise_std, a.grad_mult, int(a.momentum_init),
           HAS_MOM=has_mom, NESTEROV=a.nesterov and has_mom,
           NEED_EPS=need_eps, NEED_XI=a.noise_std_t is not None or a.noise_std != 0.0,
           HAS_GRAD_SCALE=a.grad_scale is not None, HAS_FOUND_INF=a.found_inf is not None,
           STEP_PTR=a.step_t is not None, LR_PTR=a.lr_t is not None,
           NOISE_STD_PTR=a.noise_std_t is not None,
           SR=sr, EPS_TAG0=sr and need_eps and restore_tag == 0,
           IS_BF16=ref.dtype == torch.bfloat16)


RESTORE_AND_STEP_LIST = _args.register(_LIB, "restore_and_step_list_", _args.RestoreAndStep,
                                       _restore_and_step_list)


def _all_finite_list(tensors: List[torch.Tensor]) -> torch.Tensor:
    """float32 [1]: 1.0 if any element is inf or NaN (one dtype and device, 1-D contiguous)."""
    device = tensors[0].device
    with mt.launching(device):
        tb = mt.launch_tables([tensors], CHUNK)
        if tb.n_chunks == 0:
            return torch.zeros(1, dtype=torch.float32, device=device)
        out = torch.empty(1, dtype=torch.float32, device=device)   # the last program writes it
        aligned = tb.aligned16 or all(t.data_ptr() % 16 == 0 for t in tensors if t.numel())
        all_finite_kernel[(tb.n_chunks,)](tb.chunks, tb.meta, tb.ptrs, tb.n_tensors, tensors[0],
                                          _scratch_for(device), out, tb.n_chunks,
                                          ALIGNED=aligned, CHUNK=CHUNK, BLOCK=BLOCK,
                                          num_warps=NUM_WARPS)
        return out


def _all_finite_list_fake(tensors):
    return tensors[0].new_empty(1, dtype=torch.float32)


ALL_FINITE_LIST = mt.register_list_op(
    _LIB, "all_finite_list(Tensor[] tensors) -> Tensor", _all_finite_list, _all_finite_list_fake)


# ------------------------------------------------------------------ entry points
def perturb_(params: Sequence[torch.Tensor], offsets: Sequence[int], seed: int, bucket_id: int,
             step: int | torch.Tensor, tag: int, sigma: float) -> None:
    """theta <- theta + sigma * eps(tag) for every tensor, eps at bucket indices offsets[t] + e.
    ``step``: an int or a one-element int64 tensor on the params' device (read by the kernel).
    One call of the op ``fused_flat_triton::perturb_list_`` (one launch)."""
    a = _args.perturb("fused_flat.backends.triton.perturb_", params, offsets, seed, bucket_id,
                      step, tag, sigma, DTYPES)
    if a is not None:
        PERTURB_LIST(*a)


def perturb_from_(params: Sequence[torch.Tensor], masters: Sequence[torch.Tensor],
                  offsets: Sequence[int], seed: int, bucket_id: int, step: int | torch.Tensor,
                  tag: int, sigma: float) -> None:
    """param <- round-to-nearest(master + sigma * eps(tag)) for every tensor (fp32 masters;
    fused_flat.backends.reference.perturb_from_), eps at bucket indices offsets[t] + e.
    One call of the op ``fused_flat_triton::perturb_from_list_`` (one launch)."""
    a = _args.perturb_from("fused_flat.backends.triton.perturb_from_", params, masters, offsets,
                           seed, bucket_id, step, tag, sigma, DTYPES)
    if a is not None:
        PERTURB_FROM_LIST(*a)


def restore_and_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                      moms: Sequence[torch.Tensor] | None, offsets: Sequence[int],
                      grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None, seed: int,
                      bucket_id: int, step: int | torch.Tensor, restore_tag: int, sigma: float,
                      lr: float | torch.Tensor, weight_decay: float, momentum: float,
                      dampening: float, nesterov: bool, momentum_init: bool,
                      noise_std: float | torch.Tensor, grad_mult: float,
                      stochastic_rounding: bool = False) -> None:
    """The fused restore + decay + momentum + Langevin + update pass over a tensor list (the
    math of fused_flat.backends.reference.restore_and_step_, tensor t at bucket offset offsets[t]).
    ``step`` / ``lr`` / ``noise_std`` may be one-element device tensors (module docstring).
    One call of the op ``fused_flat_triton::restore_and_step_list_`` (one launch)."""
    a = _args.restore_and_step(
        "fused_flat.backends.triton.restore_and_step_", params, grads, moms, offsets, grad_scale,
        found_inf, seed, bucket_id, step, restore_tag, sigma, lr, weight_decay, momentum,
        dampening, nesterov, momentum_init, noise_std, grad_mult, stochastic_rounding, DTYPES)
    if a is not None:
        RESTORE_AND_STEP_LIST(*a)


_scratch: dict = {}


def _scratch_for(device: torch.device) -> torch.Tensor:
    """The persistent int32 [2] (flag, programs done) of all_finite on this device and stream;
    zeroed once, left zeroed by every launch (held for the process: a graph captured with it
    keeps reading it)."""
    key = (str(device), torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0)
    s = _scratch.get(key)
    if s is None:
        s = _scratch[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return s


def all_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """found_inf: float32 [1] on the tensors' device, 1.0 if any element of any tensor is inf
    or NaN, else 0.0 (1-D contiguous tensors of one dtype of DTYPES and one device). One
    launch, no host sync (see the module docstring): one call of the op
    ``fused_flat_triton::all_finite_list``."""
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(1, dtype=torch.float32)
    what = "fused_flat.backends.triton.all_finite"
    mt.check_lists(what, "tensors", tensors)
    _args.check_dtype(what, tensors[0], DTYPES)
    return ALL_FINITE_LIST(tensors)
