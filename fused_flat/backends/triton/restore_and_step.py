"""The Triton update pass: restore + weight decay + momentum + Langevin noise + SGD update, fused.

Per element (ALGORITHMS.md §2, elementwise.h's langevin_update, fp32 math):

    theta <- theta - sigma * eps(restore_tag)                      (restore)
    d     <- g * grad_mult [/ grad_scale] + wd * theta
    m     <- d if momentum_init else mu * m + (1 - dampening) * d ; d <- m (or d + mu * m)
    theta <- theta - lr * d + noise_std * xi          (xi = z(32, i), noise layout 3)

One pass: reads theta, g, [m], writes theta, [m]. ``grad_scale`` and ``found_inf`` are
one-element float32 tensors read *inside* the kernel (no host sync, CUDA-graph safe);
found_inf != 0 leaves only the restore (theta - sigma * eps) and does not write m.
All hyperparameters are runtime arguments (an LR scheduler never recompiles); the
constexprs are layout/feature switches only: HAS_MOM, NESTEROV, NEED_EPS (sigma != 0),
NEED_XI (noise_std != 0), HAS_GRAD_SCALE, HAS_FOUND_INF, MIS (offset & 3), BLOCK.
eps = z(restore_tag, i) and xi = z(32, i) come from two Philox calls per 4 elements.

SR (constexpr, 16-bit params only): theta is stored stochastically rounded with
rbits = (w(0, i) & 0xFF) | ((w(32, i) & 0xFF) << 8) (noise.stochastic_round_bits); the
words of the eps call (when EPS_TAG0: restore_tag == 0) and of the xi call are reused, a
missing tag-0 / tag-32 call is made for the rbits alone. The skipped step's restore
(found_inf) and the momentum buffer stay round-to-nearest.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fused_flat.backends.triton.noise import step_noise, stochastic_round_bits

BLOCK = 1024
NUM_WARPS = 4


# The JIT would otherwise specialize ints equal to 1 or divisible by 16 (one compile per
# pattern as the step counter advances); none of them affects the generated code's speed.
@triton.jit(do_not_specialize=["key", "bw", "step_lo", "offset", "n", "restore_tag",
                               "momentum_init"])
def restore_and_step_kernel(param_ptr, grad_ptr, mom_ptr, grad_scale_ptr, found_inf_ptr,
                            key, bw, step_lo, offset, n, restore_tag,
                            sigma, lr, weight_decay, momentum, dampening, noise_std, grad_mult,
                            momentum_init,
                            HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr,
                            NEED_EPS: tl.constexpr, NEED_XI: tl.constexpr,
                            HAS_GRAD_SCALE: tl.constexpr,
                            HAS_FOUND_INF: tl.constexpr, MIS: tl.constexpr, BLOCK: tl.constexpr,
                            SR: tl.constexpr = False, EPS_TAG0: tl.constexpr = False,
                            IS_BF16: tl.constexpr = False):
    Q: tl.constexpr = BLOCK // 4
    pid = tl.program_id(0).to(tl.int64)
    j = (offset >> 2) + pid * Q + tl.arange(0, Q)
    start = pid * BLOCK - MIS
    local = start + tl.arange(0, BLOCK)
    mask = (local >= 0) & (local < n)
    # Whole blocks take an unmasked path (a mask would defeat 128-bit accesses unless n is
    # a multiple of 16); only the two edge blocks pay for the mask.
    full = (start >= 0) & (start + BLOCK <= n)
    m = tl.zeros([BLOCK], tl.float32)
    if full:
        theta = tl.load(param_ptr + local).to(tl.float32)
        g = tl.load(grad_ptr + local).to(tl.float32)
        if HAS_MOM:
            m = tl.load(mom_ptr + local).to(tl.float32)
    else:
        theta = tl.load(param_ptr + local, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + local, mask=mask, other=0.0).to(tl.float32)
        if HAS_MOM:
            m = tl.load(mom_ptr + local, mask=mask, other=0.0).to(tl.float32)

    eps, xi, rbits = step_noise(key, bw, j, step_lo, restore_tag, NEED_EPS, NEED_XI, SR,
                                 EPS_TAG0, BLOCK)

    if NEED_EPS:
        theta = theta - sigma * eps                     # restore
    restored = theta

    mult = grad_mult
    if HAS_GRAD_SCALE:
        mult = tl.div_rn(mult, tl.load(grad_scale_ptr))
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
        theta_out = stochastic_round_bits(theta, rbits, IS_BF16).to(param_ptr.dtype.element_ty,
                                                                   bitcast=True)
    else:
        theta_out = theta.to(param_ptr.dtype.element_ty)
    if HAS_FOUND_INF:
        fi = tl.load(found_inf_ptr)
        theta_out = tl.where(fi != 0.0, restored.to(param_ptr.dtype.element_ty), theta_out)
        if HAS_MOM:
            # skipped step (non-finite gradient): only the restore, m untouched
            buf = tl.where(fi != 0.0, m, buf)
    if full:
        tl.store(param_ptr + local, theta_out)
        if HAS_MOM:
            tl.store(mom_ptr + local, buf.to(mom_ptr.dtype.element_ty))
    else:
        tl.store(param_ptr + local, theta_out, mask=mask)
        if HAS_MOM:
            tl.store(mom_ptr + local, buf.to(mom_ptr.dtype.element_ty), mask=mask)


def grid(n: int, offset: int, block: int = BLOCK) -> tuple[int]:
    """Programs needed for n elements starting at bucket index offset."""
    return (triton.cdiv(n + (offset & 3), block),)
