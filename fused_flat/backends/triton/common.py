"""What the Triton list kernels (fused_flat/backends/triton/multi.py, sam.py) share: the
dtypes they take, the masked / unmasked block load and store, and the loads of the per-step
values a kernel may read from device memory (``capturable=True``).

DTYPES: the parameter dtypes the kernels have code for (their math is fp32; an fp64 bucket
would lose its precision). fused_flat.backends.resolve sends other buckets to another backend;
a direct call with another dtype raises ValueError (fused_flat.backends._args.check_dtype).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_flat.backends import multi_tensor as mt

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def launch(kernel, tables, lists, offsets, *args, **constexprs) -> None:
    """One launch of a list kernel over ``lists`` inside a registered op's real
    implementation: ``tables(lists, offsets) -> (Tables, launch constexprs)`` builds this
    call's tables (fused_flat.backends.multi_tensor: read on the device when the kernel
    runs), then ``kernel[(n_chunks,)](chunks, meta, ptrs, T, lists[0][0], *args, ...)``;
    no launch when the lists hold no element."""
    ref = lists[0][0]
    with mt.launching(ref.device):
        tb, kw = tables(lists, offsets)
        if tb.n_chunks:
            kernel[(tb.n_chunks,)](tb.chunks, tb.meta, tb.ptrs, tb.n_tensors, ref, *args,
                                   **constexprs, **kw)


@triton.jit
def ld(ptr, o, mask, MASKED: tl.constexpr):
    """The elements at ``ptr + o``: masked (0 outside ``mask``) for edge blocks, else a
    plain load (which the compiler may vectorize to 128 bits)."""
    if MASKED:
        x = tl.load(ptr + o, mask=mask, other=0.0)
    else:
        x = tl.load(ptr + o)
    return x


@triton.jit
def st(ptr, o, x, mask, MASKED: tl.constexpr):
    """Store ``x`` at ``ptr + o`` (inside ``mask`` when MASKED), as ``ld`` loads."""
    if MASKED:
        tl.store(ptr + o, x, mask=mask)
    else:
        tl.store(ptr + o, x)


@triton.jit
def load_step_lo(step_ptr, step_lo, STEP_PTR: tl.constexpr):
    """The step counter's low 32 bits: the host's ``step & MASK32`` (``step_lo``), or loaded
    from the int64 device tensor at ``step_ptr`` and masked the same way (STEP_PTR)."""
    if STEP_PTR:
        step_lo = tl.load(step_ptr).to(tl.int64) & 0xFFFFFFFF
    return step_lo


@triton.jit
def load_f32(ptr, value, PTR: tl.constexpr):
    """A per-step float: the host's value (a Python float, passed as fp32), or loaded from the
    float64 / float32 one-element device tensor at ``ptr`` and rounded to fp32 (RNE, as the
    launcher rounds a Python float) when PTR."""
    if PTR:
        value = tl.load(ptr).to(tl.float32)
    return value


@triton.jit
def grad_mult_and_skip(grad_mult, grad_scale_ptr, found_inf_ptr, HAS_GRAD_SCALE: tl.constexpr,
                       HAS_FOUND_INF: tl.constexpr):
    """(the gradient's factor grad_mult [/ grad_scale], whether the step is skipped
    (found_inf != 0)), both read in the kernel: no host sync."""
    mult = grad_mult
    if HAS_GRAD_SCALE:
        mult = tl.div_rn(mult, tl.load(grad_scale_ptr))
    skip = False
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr) != 0.0
    return mult, skip
