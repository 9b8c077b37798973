"""The SAM-family passes as multi-tensor Triton kernels: one launch per bucket per pass.

List ops (each list: 1-D contiguous tensors of one dtype and device, same numels across
the lists of one call); the per-element math is csrc/include/fused_flat/sam_elementwise.h,
and fused_flat/backends/sam_reference.py is the oracle:

    sam_grad_sq_norm(grads, params|None, eta) -> 0-dim float64 tensor on the device
    sam_perturb_(params, grads, backups, adaptive, coef, eta)
    sam_restore_and_step_(params, backups, grads, moms|None, grad_scale, found_inf, lr,
                          weight_decay, momentum, dampening, nesterov, momentum_init, grad_mult,
                          stochastic_rounding=False, seed=0, bucket_id=0, step=0, offsets=None)
    sam_probe_(params, backups, offsets, seed, bucket_id, step, delta)

Each is ONE registered torch op (opaque; namespace ``fused_flat_triton``:
``sam_grad_sq_norm_list``, ``sam_perturb_list_``, ``sam_restore_and_step_list_``,
``sam_probe_list_``; fused_flat.backends.multi_tensor.register_list_op), called by these Python entry points
after the argument checks (metadata only); as in fused_flat/backends/triton/multi.py the real
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
ValueError names what to pass). The fp64 fallbacks (fused_flat.backends.sam_reference) read tensor
``lr`` / ``coef`` on the host.

Math in fp32 for fp32/bf16/fp16; fp64 lists go to the reference (fp64 arithmetic), as the
flat Triton ops do. Devices: CUDA, and CPU under TRITON_INTERPRET=1.

RW-SAM's probe sign is fused_flat/backends/triton/noise.py's ``rademacher``: the top bit of
w(16, i) = x_(i & 3) of Philox call j = i >> 2 (noise-stream layout 3, ALGORITHMS.md §1);
the stochastic-rounding bits are its ``sr_bits_of`` of the tag-0 and tag-32 words.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from fused_flat.backends import multi_tensor as mt
from fused_flat.backends import sam_reference
from fused_flat.noise import check_bucket_id
from fused_flat.backends.triton.noise import (MASK32, block_words, index_words, noise_key, rademacher,
                                     sr_bits_of, stochastic_round_bits)

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
def _offs(s, it, BLOCK: tl.constexpr):
    o = s + it + tl.arange(0, BLOCK)
    return tl.max_contiguous(tl.multiple_of(o, 16), BLOCK)


@triton.jit
def _ld(ptr, o, mask, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(ptr + o, mask=mask, other=0.0)
    else:
        x = tl.load(ptr + o)
    return x


@triton.jit
def _st(ptr, o, x, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + o, x, mask=mask)
    else:
        tl.store(ptr + o, x)


# ------------------------------------------------------------------ device scalars
@triton.jit
def _step_lo(step_ptr, step_lo, STEP_PTR: tl.constexpr):
    """The step counter's low 32 bits: the host's ``step & MASK32`` (``step_lo``), or loaded
    from the int64 device tensor at ``step_ptr`` and masked the same way (STEP_PTR)."""
    if STEP_PTR:
        step_lo = tl.load(step_ptr).to(tl.int64) & 0xFFFFFFFF
    return step_lo


@triton.jit
def _f32(ptr, value, PTR: tl.constexpr):
    """A per-step float: the host's value (a Python float, passed as fp32), or loaded from the
    float64 / float32 one-element device tensor at ``ptr`` and rounded to fp32 (RNE, as the
    launcher rounds a Python float) when PTR."""
    if PTR:
        value = tl.load(ptr).to(tl.float32)
    return value


# ------------------------------------------------------------------ kernels
@triton.jit
def _sq_block(g_ptr, p_ptr, o, mask, eta, ADAPTIVE: tl.constexpr, MASKED: tl.constexpr):
    g = _ld(g_ptr, o, mask, MASKED).to(tl.float32).to(tl.float64)
    if ADAPTIVE:
        th = _ld(p_ptr, o, mask, MASKED).to(tl.float32)
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
    x = _ld(p_ptr, o, mask, MASKED)
    _st(b_ptr, o, x, mask, MASKED)
    th = x.to(tl.float32)
    g = _ld(g_ptr, o, mask, MASKED).to(tl.float32)
    if ADAPTIVE:
        t = tl.abs(th) + eta
        new = th + (coef * (t * t)) * g
    else:
        new = th + coef * g
    _st(p_ptr, o, new.to(p_ptr.dtype.element_ty), mask, MASKED)


@triton.jit(do_not_specialize=_NO_SPEC + ["coef"])
def perturb_kernel(chunks_ptr, meta_ptr, ptrs_ptr, T, carrier, coef_ptr, coef, eta,
                   ADAPTIVE: tl.constexpr, COEF_PTR: tl.constexpr, ALIGNED: tl.constexpr,
                   CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    t, s, end, _off = _row(chunks_ptr, meta_ptr, CHUNK)
    p_ptr = _ptr(ptrs_ptr, 0, T, t, carrier, ALIGNED)
    g_ptr = _ptr(ptrs_ptr, 1, T, t, carrier, ALIGNED)
    b_ptr = _ptr(ptrs_ptr, 2, T, t, carrier, ALIGNED)
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
    theta = _ld(b_ptr, o, mask, MASKED).to(tl.float32)
    g = _ld(g_ptr, o, mask, MASKED).to(tl.float32)
    d = g * mult
    d = d + weight_decay * theta
    if HAS_MOM:
        m = _ld(m_ptr, o, mask, MASKED).to(tl.float32)
        buf = tl.where(momentum_init != 0, d, momentum * m + (1.0 - dampening) * d)
        if NESTEROV:
            d = d + momentum * buf
        else:
            d = buf
        buf = tl.where(skip, m, buf)            # skipped step: momentum untouched
        _st(m_ptr, o, buf.to(m_ptr.dtype.element_ty), mask, MASKED)
    new = tl.where(skip, theta, theta - lr * d)  # skipped step: exact restore only
    if SR:   # SR of an exactly representable value (the skipped step's backup) is exact
        rb = _sr_rbits(key, bw, step_lo, gi0, o, OFF4, BLOCK)
        out = stochastic_round_bits(new, rb, IS_BF16).to(p_ptr.dtype.element_ty, bitcast=True)
    else:
        out = new.to(p_ptr.dtype.element_ty)
    _st(p_ptr, o, out, mask, MASKED)


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
    t, s, end, _off = _row(chunks_ptr, meta_ptr, CHUNK)
    p_ptr = _ptr(ptrs_ptr, 0, T, t, carrier, ALIGNED)
    b_ptr = _ptr(ptrs_ptr, 1, T, t, carrier, ALIGNED)
    g_ptr = _ptr(ptrs_ptr, 2, T, t, carrier, ALIGNED)
    m_ptr = p_ptr
    if HAS_MOM:
        m_ptr = _ptr(ptrs_ptr, 3, T, t, carrier, ALIGNED)
    lr = _f32(lr_ptr, lr, LR_PTR)
    if SR:
        step_lo = _step_lo(step_ptr, step_lo, STEP_PTR)
    mult = grad_mult
    if HAS_GRAD_SCALE:
        mult = tl.div_rn(mult, tl.load(grad_scale_ptr))
    skip = False
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr) != 0.0
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
    x = _ld(p_ptr, o, mask, MASKED)
    _st(b_ptr, o, x, mask, MASKED)
    v = rademacher(key, bw, off + o, step_lo)
    new = x.to(tl.float32) + delta * v
    _st(p_ptr, o, new.to(p_ptr.dtype.element_ty), mask, MASKED)


@triton.jit(do_not_specialize=_NO_SPEC + ["key", "bw", "step_lo", "delta"])
def probe_kernel(chunks_ptr, meta_ptr, ptrs_ptr, T, carrier, step_ptr, key, bw, step_lo, delta,
                 ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                 STEP_PTR: tl.constexpr = False):
    t, s, end, off = _row(chunks_ptr, meta_ptr, CHUNK)
    p_ptr = _ptr(ptrs_ptr, 0, T, t, carrier, ALIGNED)
    b_ptr = _ptr(ptrs_ptr, 1, T, t, carrier, ALIGNED)
    step_lo = _step_lo(step_ptr, step_lo, STEP_PTR)
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


def _no_output(*args):
    return None


def _sq_norm_list(grads: List[torch.Tensor], params: List[torch.Tensor], adaptive: bool,
                  eta: float) -> torch.Tensor:
    """``params`` is read only when ``adaptive`` (then as long as ``grads``)."""
    device = grads[0].device
    with mt.launching(device):
        tb, kw = _launch_args([grads] + ([params] if adaptive else []))
        if tb.n_chunks == 0:
            return torch.zeros((), dtype=torch.float64, device=device)
        partial = torch.empty(tb.n_chunks, dtype=torch.float64, device=device)
        sq_norm_kernel[(tb.n_chunks,)](tb.chunks, tb.meta, tb.ptrs, tb.n_tensors, partial,
                                       grads[0], eta, ADAPTIVE=adaptive, **kw)
        return partial.sum()


def _sq_norm_list_fake(grads, params, adaptive, eta):
    return grads[0].new_empty((), dtype=torch.float64)


SQ_NORM_LIST = mt.register_list_op(
    _LIB, "sam_grad_sq_norm_list(Tensor[] grads, Tensor[] params, bool adaptive, float eta) "
          "-> Tensor", _sq_norm_list, _sq_norm_list_fake)


def _perturb_list(params: List[torch.Tensor], grads: List[torch.Tensor],
                  backups: List[torch.Tensor], adaptive: bool, coef: float,
                  coef_t: Optional[torch.Tensor], eta: float) -> None:
    with mt.launching(params[0].device):
        tb, kw = _launch_args([params, grads, backups])
        if tb.n_chunks == 0:
            return
        perturb_kernel[(tb.n_chunks,)](tb.chunks, tb.meta, tb.ptrs, tb.n_tensors, params[0],
                                       coef_t if coef_t is not None else params[0], coef, eta,
                                       ADAPTIVE=adaptive, COEF_PTR=coef_t is not None, **kw)


PERTURB_LIST = mt.register_list_op(
    _LIB, "sam_perturb_list_(Tensor(a0!)[] params, Tensor[] grads, Tensor(a2!)[] backups, "
          "bool adaptive, float coef, Tensor? coef_t, float eta) -> ()",
    _perturb_list, _no_output)


def _restore_and_step_list(params: List[torch.Tensor], backups: List[torch.Tensor],
                           grads: List[torch.Tensor], moms: List[torch.Tensor],
                           grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                           lr: float, lr_t: Optional[torch.Tensor], weight_decay: float,
                           momentum: float, dampening: float, nesterov: bool,
                           momentum_init: bool, grad_mult: float, sr: bool, key: int, bw: int,
                           step_lo: int, step_t: Optional[torch.Tensor],
                           offsets: Optional[List[int]]) -> None:
    """``moms`` empty: no momentum buffers. ``sr``: the stochastic rounding of 16-bit
    params (then ``offsets`` are the tensors' bucket offsets)."""
    ref = params[0]
    has_mom = len(moms) > 0
    with mt.launching(ref.device):
        lists = [params, backups, grads] + ([moms] if has_mom else [])
        tb, kw = _launch_args(lists, offsets if sr else None)
        if tb.n_chunks == 0:
            return
        restore_and_step_kernel[(tb.n_chunks,)](
            tb.chunks, tb.meta, tb.ptrs, tb.n_tensors, ref,
            grad_scale if grad_scale is not None else ref,
            found_inf if found_inf is not None else ref,
            lr_t if lr_t is not None else ref, step_t if step_t is not None else ref,
            lr, weight_decay, momentum, dampening, grad_mult, int(bool(momentum_init)),
            HAS_MOM=has_mom, NESTEROV=bool(nesterov) and has_mom,
            HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
            key=key, bw=bw, step_lo=step_lo if sr else 0,
            SR=sr, IS_BF16=ref.dtype == torch.bfloat16,
            OFF4=sr and all(int(o) % 4 == 0 for o in offsets), LR_PTR=lr_t is not None,
            STEP_PTR=sr and step_t is not None, **kw)


RESTORE_AND_STEP_LIST = mt.register_list_op(
    _LIB, "sam_restore_and_step_list_(Tensor(a0!)[] params, Tensor[] backups, Tensor[] grads, "
          "Tensor(a3!)[] moms, Tensor? grad_scale, Tensor? found_inf, float lr, Tensor? lr_t, "
          "float weight_decay, float momentum, float dampening, bool nesterov, "
          "bool momentum_init, float grad_mult, bool sr, SymInt key, SymInt bw, "
          "SymInt step_lo, Tensor? step_t, SymInt[]? offsets) -> ()",
    _restore_and_step_list, _no_output)


def _probe_list(params: List[torch.Tensor], backups: List[torch.Tensor], offsets: List[int],
                key: int, bw: int, step_lo: int, step_t: Optional[torch.Tensor],
                delta: float) -> None:
    with mt.launching(params[0].device):
        tb, kw = _launch_args([params, backups], offsets)
        if tb.n_chunks == 0:
            return
        probe_kernel[(tb.n_chunks,)](tb.chunks, tb.meta, tb.ptrs, tb.n_tensors, params[0],
                                     step_t if step_t is not None else params[0], key, bw,
                                     step_lo, delta, STEP_PTR=step_t is not None, **kw)


PROBE_LIST = mt.register_list_op(
    _LIB, "sam_probe_list_(Tensor(a0!)[] params, Tensor(a1!)[] backups, SymInt[] offsets, "
          "SymInt key, SymInt bw, SymInt step_lo, Tensor? step_t, float delta) -> ()",
    _probe_list, _no_output)


# ------------------------------------------------------------------ argument checks
def _check_scalar(t: Optional[torch.Tensor], ref: torch.Tensor, name: str) -> None:
    if t is not None and (t.numel() != 1 or t.dtype != torch.float32 or t.device != ref.device):
        raise ValueError(f"fused_flat.backends.triton: {name} must be a one-element float32 tensor on "
                         f"{ref.device}, got {t.numel()} elements of {t.dtype} on {t.device}")


def _step_arg(what: str, step, ref: torch.Tensor):
    """(step_ptr, step_lo, STEP_PTR) of a step counter that is an int (step_lo = step & MASK32,
    a dummy pointer) or a one-element int64 tensor on ref's device (read by the kernel; no
    host read here: metadata only)."""
    if isinstance(step, torch.Tensor):
        if step.dtype != torch.int64 or step.numel() != 1 or step.device != ref.device:
            raise ValueError(
                f"{what}: step must be an int or a one-element torch.int64 tensor on "
                f"{ref.device} (e.g. torch.tensor(k, dtype=torch.int64, device='{ref.device}')), "
                f"got {step.numel()} elements of {step.dtype} on {step.device}")
        return step, 0, True
    return ref, int(step) & MASK32, False


def _float_arg(what: str, name: str, x, ref: torch.Tensor):
    """(ptr, value, PTR) of a per-step float that is a Python float (value, a dummy pointer)
    or a one-element float64 / float32 tensor on ref's device (read by the kernel, rounded to
    fp32 there as the launcher rounds a Python float)."""
    if isinstance(x, torch.Tensor):
        if x.dtype not in (torch.float64, torch.float32) or x.numel() != 1 \
                or x.device != ref.device:
            raise ValueError(
                f"{what}: {name} must be a float or a one-element torch.float64 (or float32) "
                f"tensor on {ref.device}, got {x.numel()} elements of {x.dtype} on {x.device}")
        return x, 0.0, True
    return ref, float(x), False


def _host_int(x):
    """A step for the fp64 paths (fused_flat.backends.reference needs host values): a tensor is read
    on the host here, so fp64 lists are not capturable."""
    return int(x) if isinstance(x, torch.Tensor) else x


def _host_float(x):
    """As _host_int, for lr / noise_std."""
    return float(x) if isinstance(x, torch.Tensor) else x


# ------------------------------------------------------------------ entry points
def sam_grad_sq_norm(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor] | None,
                     eta: float) -> torch.Tensor:
    """sum_i t_i^2 over every element of every tensor, float64 0-dim on the device;
    t = g, or (|theta| + eta) * g when ``params`` is given (ASAM). One call of the op
    ``fused_flat_triton::sam_grad_sq_norm_list``."""
    mt.check_lists("sam_grad_sq_norm", "grads", grads, params=params)
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    device = grads[0].device
    if grads[0].dtype == torch.float64:
        total = torch.zeros((), dtype=torch.float64, device=device)
        for i, g in enumerate(grads):
            total += sam_reference.sam_grad_sq_norm(g, None if params is None else params[i], eta)
        return total
    return SQ_NORM_LIST(
        list(grads), list(params) if params is not None else [], params is not None, float(eta))


def sam_perturb_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                 backups: Sequence[torch.Tensor], adaptive: bool, coef: float | torch.Tensor,
                 eta: float) -> None:
    """backup <- theta ; theta <- theta + (coef * s) * g, s = (|theta| + eta)^2 if adaptive
    else 1. ``coef``: a float or a 1-element tensor on the device (read in the kernel).
    One call of the op ``fused_flat_triton::sam_perturb_list_``."""
    mt.check_lists("sam_perturb_", "params", params, grads=grads, backups=backups)
    if not params:
        return
    coef_t = None
    if isinstance(coef, torch.Tensor):
        if coef.numel() != 1 or coef.device != params[0].device:
            raise ValueError(f"sam_perturb_: coef must be a float or a 1-element tensor on "
                             f"{params[0].device}, got {coef.numel()} elements on {coef.device}")
        coef_t = coef.reshape(1)
    if params[0].dtype == torch.float64:
        for p, g, b in zip(params, grads, backups):
            c = float(coef_t) if coef_t is not None else coef   # fp64 fallback: host read
            sam_reference.sam_perturb_(p, g, b, adaptive, c, eta)
        return
    PERTURB_LIST(
        list(params), list(grads), list(backups), bool(adaptive),
        0.0 if coef_t is not None else float(coef), coef_t, float(eta))


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
    mt.check_lists("sam_restore_and_step_", "params", params, backups=backups, grads=grads,
                   moms=moms)
    if not params:
        return
    _check_scalar(grad_scale, params[0], "grad_scale")
    _check_scalar(found_inf, params[0], "found_inf")
    lr_ptr, lr_f, lr_is_ptr = _float_arg("sam_restore_and_step_", "lr", lr, params[0])
    step_ptr, step_lo, step_is_ptr = _step_arg("sam_restore_and_step_", step, params[0])
    if offsets is not None and len(offsets) != len(params):
        raise ValueError(f"sam_restore_and_step_: {len(offsets)} offsets for {len(params)} tensors")
    sr = bool(stochastic_rounding) and params[0].dtype in (torch.bfloat16, torch.float16)
    if sr and not 0 <= seed < 2 ** 63:
        raise ValueError(f"sam_restore_and_step_: seed must be in [0, 2^63), got {seed}")
    key, bw = noise_key(seed, bucket_id) if sr else (0, 0)
    if params[0].dtype == torch.float64:
        for i, (p, b, g) in enumerate(zip(params, backups, grads)):
            sam_reference.sam_restore_and_step_(p, b, g, None if moms is None else moms[i],
                                                grad_scale, found_inf, _host_float(lr),
                                                weight_decay,
                                                momentum, dampening, nesterov, momentum_init,
                                                grad_mult)
        return
    if sr and offsets is None:
        offsets, acc = [], 0
        for t in params:
            offsets.append(acc)
            acc += t.numel()
    RESTORE_AND_STEP_LIST(
        list(params), list(backups), list(grads), list(moms) if moms is not None else [],
        grad_scale, found_inf, lr_f, lr_ptr if lr_is_ptr else None, float(weight_decay),
        float(momentum), float(dampening), bool(nesterov), bool(momentum_init),
        float(grad_mult), sr, key, bw, step_lo if sr else 0,
        step_ptr if sr and step_is_ptr else None,
        [int(o) for o in offsets] if sr else None)


def sam_probe_(params: Sequence[torch.Tensor], backups: Sequence[torch.Tensor],
               offsets: Sequence[int], seed: int, bucket_id: int, step: int | torch.Tensor,
               delta: float) -> None:
    """backup <- theta ; theta <- theta + delta * v, v the Rademacher probe of tag 16
    (layout 3) at bucket index offsets[t] + e of element e of tensor t. ``step``: an int or
    a one-element int64 tensor on the device (read by the kernel). One call of the op
    ``fused_flat_triton::sam_probe_list_``."""
    mt.check_lists("sam_probe_", "params", params, backups=backups)
    if len(offsets) != len(params):
        raise ValueError(f"sam_probe_: {len(offsets)} offsets for {len(params)} tensors")
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"sam_probe_: seed must be in [0, 2^63), got {seed}")
    check_bucket_id(bucket_id)
    if not params:
        return
    step_ptr, step_lo, step_is_ptr = _step_arg("sam_probe_", step, params[0])
    if params[0].dtype == torch.float64:
        raise NotImplementedError("sam_probe_: float64 lists are not supported by the Triton "
                                  "backend (use the reference)")
    PROBE_LIST(
        list(params), list(backups), [int(o) for o in offsets], *noise_key(seed, bucket_id),
        step_lo, step_ptr if step_is_ptr else None, float(delta))
