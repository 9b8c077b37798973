"""The Triton perturb pass: theta <- theta + sigma * eps(tag) over bucket elements [offset, offset + n).

One read and one write of theta per element; eps = z(tag, i) is regenerated from the
noise stream (fused_flat.backends.triton.noise, layout 3), never stored. Program p covers Philox
calls (offset >> 2) + p * BLOCK/4 + k, i.e. the local elements p * BLOCK - MIS + [0, BLOCK)
(MIS = offset & 3, a constexpr so that for an offset that is a multiple of 4 the compiler
sees an aligned, contiguous block and emits 128-bit loads/stores). Math in fp32; fp32/bf16/fp16 buckets.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fused_flat.backends.triton.noise import block_normals, rne_bf16

BLOCK = 1024
NUM_WARPS = 4


# The JIT would otherwise specialize ints equal to 1 or divisible by 16 (one compile per
# pattern as the step counter advances); none of them affects the generated code's speed.
@triton.jit(do_not_specialize=["key", "bw", "step_lo", "tag", "offset", "n"])
def perturb_kernel(param_ptr, key, bw, step_lo, tag, sigma, offset, n,
                   MIS: tl.constexpr, BLOCK: tl.constexpr):
    Q: tl.constexpr = BLOCK // 4
    pid = tl.program_id(0).to(tl.int64)
    j = (offset >> 2) + pid * Q + tl.arange(0, Q)
    start = pid * BLOCK - MIS
    local = start + tl.arange(0, BLOCK)
    mask = (local >= 0) & (local < n)
    # Whole blocks take an unmasked path (the mask would defeat 128-bit accesses unless n
    # is a multiple of 16); only the edge blocks pay for the mask.
    full = (start >= 0) & (start + BLOCK <= n)
    if full:
        theta = tl.load(param_ptr + local).to(tl.float32)
    else:
        theta = tl.load(param_ptr + local, mask=mask, other=0.0).to(tl.float32)
    eps = block_normals(key, bw, j, step_lo, tag)
    theta = (theta + sigma * eps).to(param_ptr.dtype.element_ty)
    if full:
        tl.store(param_ptr + local, theta)
    else:
        tl.store(param_ptr + local, theta, mask=mask)


def grid(n: int, offset: int, block: int = BLOCK) -> tuple[int]:
    """Programs needed for n elements starting at bucket index offset."""
    return (triton.cdiv(n + (offset & 3), block),)


@triton.jit(do_not_specialize=["key", "bw", "step_lo", "tag", "offset", "n"])
def perturb_from_kernel(param_ptr, master_ptr, key, bw, step_lo, tag, sigma, offset, n,
                        NEED_EPS: tl.constexpr, IS_BF16: tl.constexpr, MIS: tl.constexpr,
                        BLOCK: tl.constexpr):
    """param <- round-to-nearest(master + sigma * eps(tag)): fp32 master, 16-bit (or fp32)
    param; reads master, writes param. Same program layout as perturb_kernel. bf16 is
    rounded by bit manipulation (rne_bf16), so the interpreter gives the GPU's bits."""
    Q: tl.constexpr = BLOCK // 4
    pid = tl.program_id(0).to(tl.int64)
    j = (offset >> 2) + pid * Q + tl.arange(0, Q)
    start = pid * BLOCK - MIS
    local = start + tl.arange(0, BLOCK)
    mask = (local >= 0) & (local < n)
    full = (start >= 0) & (start + BLOCK <= n)
    if full:
        theta = tl.load(master_ptr + local).to(tl.float32)
    else:
        theta = tl.load(master_ptr + local, mask=mask, other=0.0).to(tl.float32)
    if NEED_EPS:
        theta = theta + sigma * block_normals(key, bw, j, step_lo, tag)
    if IS_BF16:
        out = rne_bf16(theta)
    else:
        out = theta.to(param_ptr.dtype.element_ty)
    if full:
        tl.store(param_ptr + local, out)
    else:
        tl.store(param_ptr + local, out, mask=mask)
