"""The SAM-family list ops on CUDA, with list signatures: thin wrappers of the compiled ops
``torch.ops.fused_flat.sam_grad_sq_norm_list``, ``sam_perturb_list_``,
``sam_restore_and_step_list_`` and ``sam_probe_list_`` -- the ops the CPU backend calls too,
one op set with a CPU and a CUDA kernel each (schemas csrc/sam_ops.cpp; CUDA kernels
csrc/cuda/sam_cuda.cu).

The entry points take the list signatures of fused_flat.backends' SAM_OPS (its module
docstring): sam_grad_sq_norm returns the 0-dim float64 sum on the device; sam_restore_and_step_
takes stochastic_rounding and its seed, bucket, step and offsets.

Lists hold 1-D contiguous CUDA tensors of one dtype (fp32/bf16/fp16/fp64); the math is
fused_flat/backends/sam_reference.py's (csrc/include/fused_flat/sam_elementwise.h).
``coef`` may be a Python float or a 1-element device tensor (the op's ``coef_tensor``, read by
the kernel, so the global norm never leaves the GPU); ``grad_scale`` / ``found_inf`` are read
by the kernel. One pass is one launch per bucket (more for lists past one launch's
capacity), its arguments built by the op and passed by value (csrc/cuda/list_launch.h): no
call synchronises with the host, and a first call can be captured in a CUDA graph. The
squared norm is one float64 per tensor (summed here on the device, deterministic).

These wrappers check metadata and call the op once; under FakeTensorMode or torch.compile
the op runs its fake implementation (fused_flat.backends.cpp_sam): no host read, one node per
pass. The by-value argument building lives in the op's CUDA implementation, which fake
tensors replace: tests/test_gpu_sync.py checks it on a GPU (``make gpu-check``).

Device-resident per-step scalars (CUDA-graph capture, ``capturable=True``): the ``lr`` of
``sam_restore_and_step_`` may be a one-element float64 (or float32) tensor, and the ``step``
of its stochastic rounding and of ``sam_probe_`` a one-element int64 tensor, on the params'
device: read by the kernel when it runs, never on the host, converted as the scalar path
converts ``float(t)`` / ``int(t)`` (bit-identical results; fused_flat.backends.cuda).
"""
from __future__ import annotations

from typing import Sequence

import torch

from fused_flat.backends import cpp_sam as _cpp_sam  # noqa: F401  (the ops' fake implementations)
from fused_flat.backends import multi_tensor as mt   # check_lists: metadata checks only
from fused_flat.backends.cuda import (_FLOAT_DTYPES, _STEP_DTYPES, _device, _host, _ops,
                                      available, check_device, device_scalar)

__all__ = ["available", "sam_grad_sq_norm", "sam_perturb_", "sam_restore_and_step_", "sam_probe_"]


def _check_device(ref: torch.Tensor) -> torch.device:
    device = _device(ref, "cuda_sam", "triton.sam, cpp_sam or sam_reference")
    check_device(ref)
    return device


# ------------------------------------------------------------------ entry points
def sam_grad_sq_norm(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor] | None,
                     eta: float) -> torch.Tensor:
    """sum_i t_i^2, float64 0-dim on the device; t = g, or (|theta| + eta) g (ASAM). One call
    of the op ``fused_flat::sam_grad_sq_norm_list`` (per tensor), summed on the device."""
    mt.check_lists("sam_grad_sq_norm", "grads", grads, params=params)
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    _check_device(grads[0])
    parts = _ops().sam_grad_sq_norm_list(list(grads), list(params) if params is not None else [],
                                         params is not None, float(eta))
    return parts[0] if len(parts) == 1 else parts.sum()


def sam_perturb_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                 backups: Sequence[torch.Tensor], adaptive: bool, coef: float | torch.Tensor,
                 eta: float) -> None:
    """backup <- theta ; theta <- theta + (coef * s) * g, s = (|theta| + eta)^2 if adaptive.
    One call of the op ``fused_flat::sam_perturb_list_``."""
    mt.check_lists("sam_perturb_", "params", params, grads=grads, backups=backups)
    if not params:
        return
    _check_device(params[0])
    coef_t = None
    if isinstance(coef, torch.Tensor):
        coef_t = coef.reshape(1).to(torch.float64)   # device op (no-op for float64): no sync
        coef = 0.0
    _ops().sam_perturb_list_(list(params), list(grads), list(backups), bool(adaptive),
                             float(coef), float(eta), None, coef_t)


def sam_restore_and_step_(params: Sequence[torch.Tensor], backups: Sequence[torch.Tensor],
                          grads: Sequence[torch.Tensor], moms: Sequence[torch.Tensor] | None,
                          grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
                          lr: float | torch.Tensor, weight_decay: float, momentum: float,
                          dampening: float, nesterov: bool, momentum_init: bool, grad_mult: float,
                          stochastic_rounding: bool = False, seed: int = 0, bucket_id: int = 0,
                          step: int | torch.Tensor = 0,
                          offsets: Sequence[int] | None = None) -> None:
    """theta <- backup, then torch.optim.SGD's update with g2; found_inf set: restore only.
    ``stochastic_rounding`` (bf16/fp16; ignored otherwise): theta stored as SR(theta) with
    the rbits of (seed, bucket_id, step) at bucket index offsets[t] + e (offsets default to
    the packed prefix sums of the numels). ``lr`` / ``step`` may be one-element device
    tensors (module docstring). One call of the op ``fused_flat::sam_restore_and_step_list_``."""
    mt.check_lists("sam_restore_and_step_", "params", params, backups=backups, grads=grads,
                   moms=moms)
    if offsets is not None and len(offsets) != len(params):
        raise ValueError(f"sam_restore_and_step_: {len(offsets)} offsets for {len(params)} tensors")
    if not params:
        return
    dev = _check_device(params[0])
    sr = bool(stochastic_rounding) and params[0].dtype in (torch.bfloat16, torch.float16)
    lr_t = device_scalar("cuda_sam.sam_restore_and_step_", "lr", lr, dev, _FLOAT_DTYPES)
    step_t = device_scalar("cuda_sam.sam_restore_and_step_", "step", step, dev, _STEP_DTYPES)
    if sr and offsets is None:   # the packed prefix sums of the numels
        offsets, acc = [], 0
        for p in params:
            offsets.append(acc)
            acc += p.numel()
    _ops().sam_restore_and_step_list_(
        list(params), list(backups), list(grads), list(moms) if moms is not None else [],
        grad_scale, found_inf, _host(lr, lr_t, float), float(weight_decay), float(momentum),
        float(dampening), bool(nesterov), bool(momentum_init), float(grad_mult), sr, int(seed),
        int(bucket_id), _host(step, step_t, int),
        [int(o) for o in offsets] if offsets is not None else [], None, lr_t, step_t)


def sam_probe_(params: Sequence[torch.Tensor], backups: Sequence[torch.Tensor],
               offsets: Sequence[int], seed: int, bucket_id: int, step: int | torch.Tensor,
               delta: float) -> None:
    """backup <- theta ; theta <- theta + delta * v (Rademacher, tag 16, layout 3) at bucket
    index offsets[t] + e. ``step`` may be a one-element int64 device tensor. One call of the
    op ``fused_flat::sam_probe_list_``."""
    mt.check_lists("sam_probe_", "params", params, backups=backups)
    if len(offsets) != len(params):
        raise ValueError(f"sam_probe_: {len(offsets)} offsets for {len(params)} tensors")
    if not params:
        return
    _check_device(params[0])
    step_t = device_scalar("cuda_sam.sam_probe_", "step", step, params[0].device, _STEP_DTYPES)
    _ops().sam_probe_list_(list(params), list(backups), [int(o) for o in offsets], int(seed),
                           int(bucket_id), _host(step, step_t, int), float(delta), step_t)
