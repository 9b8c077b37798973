"""Typed Python entry points of the compiled SAM-family ops (``torch.ops.fused_flat.sam_*``).

Schemas: csrc/sam_ops.cpp; CPU kernels: csrc/cpu/sam_cpu.cpp; the math they implement:
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
    if not hasattr(torch.ops.fused_flat, "sam_perturb_"):
        raise RuntimeError("fused_flat: the compiled extension predates the SAM ops; rebuild it "
                           f"({_native.BUILD_HINT}), or use backend='reference'.")
    return torch.ops.fused_flat


def sam_grad_sq_norm(grad: torch.Tensor, param: torch.Tensor | None = None,
                     eta: float = 0.0) -> torch.Tensor:
    """sum_i t_i^2 in float64 (0-dim), t = g, or (|theta| + eta) * g when ``param`` is given."""
    return _ops().sam_grad_sq_norm(grad, param, eta)


def sam_perturb_(param: torch.Tensor, grad: torch.Tensor, backup: torch.Tensor, adaptive: bool,
                 coef: float, eta: float = 0.0) -> None:
    """backup <- theta ; theta <- theta + (coef * s) * g, s = (|theta| + eta)^2 (ASAM) or 1.
    ``coef`` may be a 0-dim CPU tensor (torch.compile: a graph value, read when the op runs)."""
    if isinstance(coef, torch.Tensor):
        _ops()
        torch.ops.fused_flat.sam_perturb_t_(param, grad, backup, adaptive, coef, eta)
        return
    _ops().sam_perturb_(param, grad, backup, adaptive, coef, eta)


def sam_restore_and_step_(param: torch.Tensor, backup: torch.Tensor, grad: torch.Tensor,
                          momentum_buffer: torch.Tensor | None, grad_scale: torch.Tensor | None,
                          found_inf: torch.Tensor | None, lr: float, weight_decay: float,
                          momentum: float, dampening: float, nesterov: bool, momentum_init: bool,
                          grad_mult: float, stochastic_rounding: bool = False, seed: int = 0,
                          bucket_id: int = 0, step: int = 0, offset: int = 0) -> None:
    """theta <- backup, then torch.optim.SGD's update with g2 (see sam_reference); one pass.
    ``stochastic_rounding``: bf16/fp16 params get SR(theta) with the rbits (tags 0, 32) of
    (seed, bucket_id, step) at bucket indices offset + e. ``lr`` and ``step`` may be 0-dim CPU
    tensors (torch.compile: graph inputs, not guards; read on the host when the op runs)."""
    if isinstance(lr, torch.Tensor) or isinstance(step, torch.Tensor):
        _ops()
        torch.ops.fused_flat.sam_restore_and_step_t_(
            param, backup, grad, momentum_buffer, grad_scale, found_inf,
            torch.as_tensor(lr, dtype=torch.float64), weight_decay, momentum, dampening, nesterov,
            momentum_init, grad_mult, stochastic_rounding, seed, bucket_id,
            torch.as_tensor(step, dtype=torch.int64), offset)
        return
    _ops().sam_restore_and_step_(param, backup, grad, momentum_buffer, grad_scale, found_inf, lr,
                                 weight_decay, momentum, dampening, nesterov, momentum_init,
                                 grad_mult, stochastic_rounding, seed, bucket_id, step, offset)


def sam_probe_(param: torch.Tensor, backup: torch.Tensor, seed: int, bucket_id: int, step: int,
               delta: float, offset: int = 0) -> None:
    """backup <- theta ; theta <- theta + delta * v (Rademacher, tag 16); one pass."""
    _ops().sam_probe_(param, backup, seed, bucket_id, step, delta, offset)


def has_list_ops() -> bool:
    """Whether the extension has the SAM list forms (sam_*_list): built from these sources."""
    return _native.available() and hasattr(torch.ops.fused_flat, "sam_perturb_list_")


def sam_grad_sq_norm_list(grads: list[torch.Tensor], params: list[torch.Tensor], adaptive: bool,
                          eta: float = 0.0, layout: torch.Tensor | None = None) -> torch.Tensor:
    """float64 [T]: entry t = sam_grad_sq_norm(grads[t], params[t] if adaptive, eta), every
    tensor in one parallel loop. Without ``layout`` the tensors are 1-D contiguous (``params``
    may be empty when not adaptive); with it (fused_flat.backends.cpp.plan_layout of ``params``) they
    are the user's own tensors, the gradients read in their parameter's memory order."""
    return _ops().sam_grad_sq_norm_list(grads, params, adaptive, eta, layout)


def sam_perturb_list_(params: list[torch.Tensor], grads: list[torch.Tensor],
                      backups: list[torch.Tensor], adaptive: bool, coef: float | torch.Tensor,
                      eta: float = 0.0, layout: torch.Tensor | None = None) -> None:
    """sam_perturb_ over a list in one parallel loop; ``layout`` as in sam_grad_sq_norm_list
    (the backups then share their parameter's layout). ``coef`` may be a one-element float64
    CPU tensor (read when the op runs)."""
    coef, coef_t = scalar_arg(coef, float)
    _ops().sam_perturb_list_(params, grads, backups, adaptive, coef, eta, layout, coef_t)


def sam_restore_and_step_list_(params, backups, grads, moms, grad_scale, found_inf, lr: float,
                               weight_decay: float, momentum: float, dampening: float,
                               nesterov: bool, momentum_init: bool, grad_mult: float,
                               stochastic_rounding: bool = False, seed: int = 0, bucket_id: int = 0,
                               step: int = 0, offsets=None, layout: torch.Tensor | None = None) -> None:
    """sam_restore_and_step_ over a list in one parallel loop (``moms`` None: no momentum;
    ``offsets``: the bucket offsets, needed with stochastic rounding); ``layout`` as in
    sam_grad_sq_norm_list. ``lr`` / ``step`` may be one-element CPU tensors (float64 or
    float32; int64), read when the op runs."""
    lr, lr_t = scalar_arg(lr, float)
    step, step_t = scalar_arg(step, int)
    _ops().sam_restore_and_step_list_(params, backups, grads, moms or [], grad_scale, found_inf, lr,
                                      weight_decay, momentum, dampening, nesterov, momentum_init,
                                      grad_mult, stochastic_rounding, seed, bucket_id, step,
                                      list(offsets) if offsets is not None else [], layout, lr_t,
                                      step_t)


def sam_probe_list_(params: list[torch.Tensor], backups: list[torch.Tensor], offsets: list[int],
                    seed: int, bucket_id: int, step: int | torch.Tensor, delta: float) -> None:
    """sam_probe_ over a list of 1-D tensors of one dtype in one parallel loop (tensor t at
    bucket offset offsets[t]); ``step`` may be a one-element int64 CPU tensor."""
    step, step_t = scalar_arg(step, int)
    _ops().sam_probe_list_(params, backups, list(offsets), seed, bucket_id, step, delta, step_t)


if _native.available() and hasattr(torch.ops.fused_flat, "sam_perturb_"):

    @torch.library.register_fake("fused_flat::sam_grad_sq_norm")
    def _sq_norm_fake(grad, param=None, eta=0.0):
        return torch.empty((), dtype=torch.float64, device=grad.device)

    @torch.library.register_fake("fused_flat::sam_perturb_")
    def _perturb_fake(param, grad, backup, adaptive, coef, eta=0.0):
        return None

    @torch.library.register_fake("fused_flat::sam_restore_and_step_")
    def _restore_and_step_fake(param, backup, grad, momentum_buffer, grad_scale, found_inf, lr,
                               weight_decay, momentum, dampening, nesterov, momentum_init,
                               grad_mult, stochastic_rounding=False, seed=0, bucket_id=0, step=0,
                               offset=0):
        return None

    @torch.library.register_fake("fused_flat::sam_probe_")
    def _probe_fake(param, backup, seed, bucket_id, step, delta, offset=0):
        return None

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


    # Tensor-argument forms (torch.compile; see fused_flat.backends.cpp): the per-step coefficient,
    # the learning rate and the step counter as 0-dim CPU tensors, read when the op runs.
    @torch.library.custom_op("fused_flat::sam_perturb_t_", mutates_args=("param", "backup"))
    def _sam_perturb_t(param: torch.Tensor, grad: torch.Tensor, backup: torch.Tensor,
                       adaptive: bool, coef: torch.Tensor, eta: float) -> None:
        torch.ops.fused_flat.sam_perturb_(param, grad, backup, adaptive, float(coef), eta)

    @_sam_perturb_t.register_fake
    def _(param, grad, backup, adaptive, coef, eta):
        return None

    @torch.library.custom_op("fused_flat::sam_restore_and_step_t_",
                             mutates_args=("param", "momentum_buffer"))
    def _sam_restore_and_step_t(param: torch.Tensor, backup: torch.Tensor, grad: torch.Tensor,
                                momentum_buffer: torch.Tensor | None,
                                grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
                                lr: torch.Tensor, weight_decay: float, momentum: float,
                                dampening: float, nesterov: bool, momentum_init: bool,
                                grad_mult: float, stochastic_rounding: bool, seed: int,
                                bucket_id: int, step: torch.Tensor, offset: int) -> None:
        torch.ops.fused_flat.sam_restore_and_step_(
            param, backup, grad, momentum_buffer, grad_scale, found_inf, float(lr), weight_decay,
            momentum, dampening, nesterov, momentum_init, grad_mult, stochastic_rounding, seed,
            bucket_id, int(step), offset)

    @_sam_restore_and_step_t.register_fake
    def _(param, backup, grad, momentum_buffer, grad_scale, found_inf, lr, weight_decay, momentum,
          dampening, nesterov, momentum_init, grad_mult, stochastic_rounding, seed, bucket_id,
          step, offset):
        return None
