"""Typed Python entry points of the compiled SAM-family ops (``torch.ops.fused_flat.sam_*``).

Schemas: csrc/sam_ops.cpp; kernels: csrc/cpu/sam_cpu.cpp, csrc/cuda/sam_cuda.cu; the math:
fused_flat/backends/sam_reference.py. Fake implementations are registered so the ops trace under
``torch.compile``. Importing never fails; calling an op without the extension raises with
the reason and the fix.
"""
from __future__ import annotations

import torch

from fused_flat.backends import _native
from fused_flat.backends.cpp import scalar_arg


def _ops():
    if not _native.available():
        raise RuntimeError(
            f"fused_flat: the compiled extension is not available ({_native.load_error}); "
            f"{_native.BUILD_HINT}, or use backend='reference'."
        )
    if not hasattr(torch.ops.fused_flat, "sam_probe_list_"):
        raise RuntimeError("fused_flat: the compiled extension predates the SAM ops; rebuild it "
                           f"({_native.BUILD_HINT}), or use backend='reference'.")
    return torch.ops.fused_flat


def has_list_ops() -> bool:
    """Whether the extension has the SAM list forms (sam_*_list): built from these sources."""
    return _native.available() and hasattr(torch.ops.fused_flat, "sam_perturb_list_")


def sam_grad_sq_norm_list(grads: list[torch.Tensor], params: list[torch.Tensor], adaptive: bool,
                          eta: float = 0.0, layout: torch.Tensor | None = None) -> torch.Tensor:
    """float64 [T]: entry t = sum_i s_i^2 in float64, s = g (SAM) or (|theta| + eta) * g
    (ASAM: ``adaptive``, params[t]), every tensor in one parallel loop (CPU) or launch
    (CUDA). Without ``layout`` the tensors are 1-D contiguous (``params`` may be empty when
    not adaptive); with it (fused_flat.backends.cpp.plan_layout of ``params``) they are the
    user's own tensors, the gradients read in their parameter's memory order."""
    return _ops().sam_grad_sq_norm_list(grads, params, adaptive, eta, layout)


def sam_perturb_list_(params: list[torch.Tensor], grads: list[torch.Tensor],
                      backups: list[torch.Tensor], adaptive: bool, coef: float | torch.Tensor,
                      eta: float = 0.0, layout: torch.Tensor | None = None) -> None:
    """backup <- theta ; theta <- theta + (coef * s) * g, s = (|theta| + eta)^2 (ASAM) or 1,
    over a list in one parallel loop; ``layout`` as in sam_grad_sq_norm_list
    (the backups then share their parameter's layout). ``coef`` may be a one-element float64
    tensor on the lists' device (read when the op runs)."""
    coef, coef_t = scalar_arg(coef, float)
    _ops().sam_perturb_list_(params, grads, backups, adaptive, coef, eta, layout, coef_t)


def sam_restore_and_step_list_(params, backups, grads, moms, grad_scale, found_inf, lr: float,
                               weight_decay: float, momentum: float, dampening: float,
                               nesterov: bool, momentum_init: bool, grad_mult: float,
                               stochastic_rounding: bool = False, seed: int = 0, bucket_id: int = 0,
                               step: int = 0, offsets=None, layout: torch.Tensor | None = None) -> None:
    """theta <- backup, then torch.optim.SGD's update with g2 (see sam_reference), over a
    list in one parallel loop (``moms`` None: no momentum; ``stochastic_rounding``: bf16/fp16
    params get SR(theta) with the rbits (tags 0, 32) of (seed, bucket_id, step);
    ``offsets``: the bucket offsets, needed with stochastic rounding); ``layout`` as in
    sam_grad_sq_norm_list. ``lr`` / ``step`` may be one-element tensors on the lists' device
    (float64 or float32; int64), read when the op runs."""
    lr, lr_t = scalar_arg(lr, float)
    step, step_t = scalar_arg(step, int)
    _ops().sam_restore_and_step_list_(params, backups, grads, moms or [], grad_scale, found_inf, lr,
                                      weight_decay, momentum, dampening, nesterov, momentum_init,
                                      grad_mult, stochastic_rounding, seed, bucket_id, step,
                                      list(offsets) if offsets is not None else [], layout, lr_t,
                                      step_t)


def sam_probe_list_(params: list[torch.Tensor], backups: list[torch.Tensor], offsets: list[int],
                    seed: int, bucket_id: int, step: int | torch.Tensor, delta: float) -> None:
    """backup <- theta ; theta <- theta + delta * v (Rademacher, tag 16) over a list of 1-D
    tensors of one dtype in one parallel loop (tensor t's element e at bucket index
    offsets[t] + e); ``step`` may be a one-element int64 tensor on the lists' device."""
    step, step_t = scalar_arg(step, int)
    _ops().sam_probe_list_(params, backups, list(offsets), seed, bucket_id, step, delta, step_t)


if _native.available():
    if hasattr(torch.ops.fused_flat, "sam_perturb_list_"):
        @torch.library.register_fake("fused_flat::sam_grad_sq_norm_list")
        def _sq_norm_list_fake(grads, params, adaptive, eta, layout=None):
            if not grads:
                return torch.empty(0, dtype=torch.float64)
            return grads[0].new_empty(len(grads), dtype=torch.float64)

        @torch.library.register_fake("fused_flat::sam_perturb_list_")
        def _perturb_list_fake(params, grads, backups, adaptive, coef, eta, layout=None,
                               coef_tensor=None):
            return None

        @torch.library.register_fake("fused_flat::sam_restore_and_step_list_")
        def _restore_and_step_list_fake(params, backups, grads, moms, grad_scale, found_inf, lr,
                                        weight_decay, momentum, dampening, nesterov, momentum_init,
                                        grad_mult, stochastic_rounding=False, seed=0, bucket_id=0,
                                        step=0, offsets=(), layout=None, lr_t=None, step_t=None):
            return None

    if hasattr(torch.ops.fused_flat, "sam_probe_list_"):
        @torch.library.register_fake("fused_flat::sam_probe_list_")
        def _probe_list_fake(params, backups, offsets, seed, bucket_id, step, delta, step_t=None):
            return None
