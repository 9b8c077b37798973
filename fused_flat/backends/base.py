"""What a backend is, below the resolver: the Backend record (its list passes and what it
takes: devices, dtypes, device-resident per-step values), ``lift`` (a list Backend from
per-tensor ops: the reference), ``from_list_ops`` (a Backend from the compiled list ops,
torch.ops.fused_flat: 'cpp', and 'cuda' below its CUDA wrappers) and ``with_*_lists`` (a
Backend with the list ops of a module that already takes lists: Triton, CUDA).

fused_flat.backends (the resolver) re-exports all of it; the backend modules
(fused_flat.backends.triton, ...) import it from here, so that no import goes back up to
the resolver.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Callable

import torch

SAM_OPS = ("sam_grad_sq_norm", "sam_perturb_", "sam_restore_and_step_", "sam_probe_")
LANGEVIN_OPS = ("perturb_", "restore_and_step_", "all_finite")


@dataclass(frozen=True)
class Backend:
    name: str
    perturb_: Callable
    restore_and_step_: Callable
    devices: tuple  # device types it runs on
    sam_grad_sq_norm: Callable | None = None
    sam_perturb_: Callable | None = None
    sam_restore_and_step_: Callable | None = None
    sam_probe_: Callable | None = None
    all_finite: Callable | None = None   # (tensors) -> float32 [1], 1.0 if any inf/nan
    perturb_from_: Callable | None = None   # (params16, masters32, offsets, seed, bucket, step, tag, sigma)
    stochastic_rounding: bool = False   # restore_and_step_ / sam_restore_and_step_ can round stochastically
    # step / lr / noise_std may be one-element tensors on the bucket's device, read by the
    # kernels (no host read: capturable=True on CUDA). Every backend takes CPU tensors.
    device_scalars: bool = False
    # (params, grads, offsets, seed, bucket, step, tag, sigma) -> float32 [1] found_inf: the
    # restore half of a checked fp32 step with the finiteness check in the same pass (cpp)
    restore_check_: Callable | None = None
    # Step plans (fused_flat.optim.core.StepPlan; cpp): plan_layout(tensors) -> the record the list
    # passes take as ``layout=`` (the user's tensors as they are, any dense shape);
    # check_step(params, layout, grads, has_grad, finite) -> found_inf, the first pass of a
    # planned step (writes nothing). None: this backend runs no plans.
    plan_layout: Callable | None = None
    check_step: Callable | None = None
    # The floating dtypes its kernels take (resolve() sends other buckets elsewhere).
    dtypes: tuple = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    # Its ops take step / lr as one-element CPU tensors read in the op (cpp, reference): under
    # torch.compile the optimizer hands them over as tensors, so their values put no guard.
    cpu_tensor_scalars: bool = False

    def supports(self, t: torch.Tensor) -> bool:
        return t.device.type in self.devices and t.dtype in self.dtypes

    @property
    def has_sam(self) -> bool:
        return self.sam_perturb_ is not None


# --------------------------------------------------------------------------- list lifting
def lift(name: str, devices: tuple, perturb_, restore_and_step_, sam=None,
         all_finite=None, perturb_from_=None) -> Backend:
    """A list Backend from per-tensor ops (signatures of fused_flat.backends.reference /
    sam_reference, tensor arguments 1-D and ``offset`` the tensor's bucket offset): each
    list pass calls the op once per tensor (the reference backend).

    Per-step values (step, lr, noise_std, SAM's coef) are handed over as they come, numbers
    or one-element tensors (``capturable=True``, torch.compile): the lifted ops take both, as
    the reference's do (used in the computation, no host read), so the Backend says
    ``cpu_tensor_scalars`` and under torch.compile they are graph inputs, not guards. A step
    plan's ``layout=`` is refused: only the compiled list ops (:func:`from_list_ops`) take
    one."""

    def perturb_list(params, offsets, seed, bucket_id, step, tag, sigma, layout=None):
        _no_layout(name, layout)
        for p, off in zip(params, offsets):
            perturb_(p, seed, bucket_id, step, tag, sigma, off)

    def restore_and_step_list(params, grads, moms, offsets, grad_scale, found_inf, seed, bucket_id,
                              step, restore_tag, sigma, lr, weight_decay, momentum, dampening,
                              nesterov, momentum_init, noise_std, grad_mult,
                              stochastic_rounding=False, layout=None):
        _no_layout(name, layout)
        extra = (True,) if stochastic_rounding else ()
        for t, (p, g, off) in enumerate(zip(params, grads, offsets)):
            restore_and_step_(p, g, moms[t] if moms is not None else None, grad_scale, found_inf,
                              seed, bucket_id, step, off, restore_tag, sigma, lr, weight_decay,
                              momentum, dampening, nesterov, momentum_init, noise_std, grad_mult,
                              *extra)

    kw = {}
    if sam is not None:
        def sq_norm_list(grads, params, eta, adaptive=None, layout=None):
            """0-dim float64: the sum over the list (``adaptive`` None: iff params are given)."""
            _no_layout(name, layout)
            adaptive = params is not None if adaptive is None else adaptive
            if not grads:
                return torch.zeros((), dtype=torch.float64)
            parts = [sam.sam_grad_sq_norm(g, params[t] if adaptive else None, eta)
                     for t, g in enumerate(grads)]
            return parts[0] if len(parts) == 1 else torch.stack(parts).sum()

        def sam_perturb_list(params, grads, backups, adaptive, coef, eta, layout=None):
            _no_layout(name, layout)
            for p, g, b in zip(params, grads, backups):
                sam.sam_perturb_(p, g, b, adaptive, coef, eta)

        def sam_restore_list(params, backups, grads, moms, grad_scale, found_inf, lr, weight_decay,
                             momentum, dampening, nesterov, momentum_init, grad_mult,
                             stochastic_rounding=False, seed=0, bucket_id=0, step=0, offsets=None,
                             layout=None):
            _no_layout(name, layout)
            for t, (p, b, g) in enumerate(zip(params, backups, grads)):
                extra = (True, seed, bucket_id, step, offsets[t]) if stochastic_rounding else ()
                sam.sam_restore_and_step_(p, b, g, moms[t] if moms is not None else None,
                                          grad_scale, found_inf, lr, weight_decay, momentum,
                                          dampening, nesterov, momentum_init, grad_mult, *extra)

        def sam_probe_list(params, backups, offsets, seed, bucket_id, step, delta):
            for p, b, off in zip(params, backups, offsets):
                sam.sam_probe_(p, b, seed, bucket_id, step, delta, off)

        kw = dict(sam_grad_sq_norm=sq_norm_list, sam_perturb_=sam_perturb_list,
                  sam_restore_and_step_=sam_restore_list, sam_probe_=sam_probe_list)
    if all_finite is None:
        from fused_flat.backends.reference import all_finite
    sr = "stochastic_rounding" in inspect.signature(restore_and_step_).parameters and (
        sam is None or "stochastic_rounding" in inspect.signature(sam.sam_restore_and_step_).parameters)
    return Backend(name, perturb_list, restore_and_step_list, devices, all_finite=all_finite,
                   perturb_from_=_perturb_from_list(name, perturb_from_, lambda v: v),
                   stochastic_rounding=sr, cpu_tensor_scalars=True, **kw)


def from_list_ops(name: str, devices: tuple, ops, sam_ops=None, cpu_tensor_scalars=False) -> Backend:
    """A Backend whose passes are the compiled list ops (fused_flat.backends.cpp ``ops``:
    perturb_list_, restore_and_step_list_, all_finite, perturb_from_; fused_flat.backends.cpp_sam
    ``sam_ops``: the sam_*_list_ ops), one op call per bucket and pass in every case --
    eager and compiled, per-step values as numbers or tensors. A tensor step / lr /
    noise_std / coef goes to the op's tensor argument (``step_t``, ``lr_t``, ``noise_std_t``,
    ``coef_tensor``), read when the op runs (CPU) or by the kernel (CUDA), converted as the
    number is: the same bits either way; under torch.compile it is a graph input, not a
    guard. ``layout=``: a step plan's record (fused_flat.backends.cpp.plan_layout), the
    tensors then the user's own, any dense shape."""

    def perturb_list(params, offsets, seed, bucket_id, step, tag, sigma, layout=None):
        if params:
            ops.perturb_list_(params, list(offsets), seed, bucket_id, step, tag, sigma, layout)

    def restore_and_step_list(params, grads, moms, offsets, grad_scale, found_inf, seed, bucket_id,
                              step, restore_tag, sigma, lr, weight_decay, momentum, dampening,
                              nesterov, momentum_init, noise_std, grad_mult,
                              stochastic_rounding=False, layout=None):
        if params:
            ops.restore_and_step_list_(params, grads, moms, list(offsets), grad_scale, found_inf,
                                       seed, bucket_id, step, restore_tag, sigma, lr, weight_decay,
                                       momentum, dampening, nesterov, momentum_init, noise_std,
                                       grad_mult, stochastic_rounding, layout)

    kw = {}
    if sam_ops is not None:
        def sq_norm_list(grads, params, eta, adaptive=None, layout=None):
            """0-dim float64: the sum over the list (``adaptive`` None: iff params are given)."""
            adaptive = params is not None if adaptive is None else adaptive
            if not grads:
                return torch.zeros((), dtype=torch.float64)
            parts = sam_ops.sam_grad_sq_norm_list(grads, params or [], adaptive, eta, layout)
            return parts[0] if len(parts) == 1 else parts.sum()

        def sam_perturb_list(params, grads, backups, adaptive, coef, eta, layout=None):
            if not params:
                return
            if isinstance(coef, torch.Tensor):   # the op's coef_tensor is float64 (exact widening)
                coef = coef.to(torch.float64)
            else:
                coef = float(coef)
            sam_ops.sam_perturb_list_(params, grads, backups, adaptive, coef, eta, layout)

        def sam_restore_list(params, backups, grads, moms, grad_scale, found_inf, lr, weight_decay,
                             momentum, dampening, nesterov, momentum_init, grad_mult,
                             stochastic_rounding=False, seed=0, bucket_id=0, step=0, offsets=None,
                             layout=None):
            if params:
                sam_ops.sam_restore_and_step_list_(params, backups, grads, moms, grad_scale,
                                                   found_inf, lr, weight_decay, momentum,
                                                   dampening, nesterov, momentum_init, grad_mult,
                                                   stochastic_rounding, seed, bucket_id, step,
                                                   offsets, layout)

        def sam_probe_list(params, backups, offsets, seed, bucket_id, step, delta):
            if params:
                sam_ops.sam_probe_list_(params, backups, list(offsets), seed, bucket_id, step,
                                        delta)

        kw = dict(sam_grad_sq_norm=sq_norm_list, sam_perturb_=sam_perturb_list,
                  sam_restore_and_step_=sam_restore_list, sam_probe_=sam_probe_list)
    return Backend(name, perturb_list, restore_and_step_list, devices, all_finite=ops.all_finite,
                   perturb_from_=_perturb_from_list(name, ops.perturb_from_, _host),
                   stochastic_rounding=True, cpu_tensor_scalars=cpu_tensor_scalars, **kw)


def _perturb_from_list(name: str, perturb_from_, step_of):
    """The master-weight perturbation over a list, from a per-tensor op (one call a tensor)."""
    def perturb_from_list(params, masters, offsets, seed, bucket_id, step, tag, sigma):
        if perturb_from_ is None:
            raise NotImplementedError(f"fused_flat: backend '{name}' has no perturb_from_ kernel "
                                      f"(master_weights=True); use backend='reference'")
        step = step_of(step)
        for p, m, off in zip(params, masters, offsets):
            perturb_from_(p, m, seed, bucket_id, step, tag, sigma, off)
    return perturb_from_list


def _no_layout(name: str, layout) -> None:
    if layout is not None:
        raise ValueError(f"fused_flat: backend '{name}' runs no step plans (its ops take no "
                         f"layout); a plan needs Backend.plan_layout (backend 'cpp')")


def _host(v):
    """The Python value of a one-element CPU tensor (a per-step value handed to an op that
    takes numbers); anything else unchanged. Refuses a device tensor: that would be a sync."""
    if isinstance(v, torch.Tensor):
        if v.device.type != "cpu":
            raise ValueError(f"fused_flat: this backend takes the per-step values (step, lr) as "
                             f"numbers or CPU tensors, got a tensor on {v.device}; use "
                             f"backend='triton' or 'cuda' with capturable=True")
        return v.item()
    return v


def with_sam_lists(b: Backend, mod) -> Backend:
    """``b`` with the SAM-family list ops of ``mod`` (functions already taking lists: one
    launch per bucket, fused_flat.backends.triton.sam and fused_flat.backends.cuda_sam)."""
    sr = b.stochastic_rounding and "stochastic_rounding" in inspect.signature(
        mod.sam_restore_and_step_).parameters
    return dataclasses.replace(b, stochastic_rounding=sr,
                               **{name: getattr(mod, name) for name in SAM_OPS})


def with_langevin_lists(b: Backend, mod) -> Backend:
    """``b`` with the Langevin list ops and ``all_finite`` of ``mod`` (functions already
    taking lists: one launch per bucket, fused_flat.backends.triton.multi and fused_flat.backends.cuda)."""
    return dataclasses.replace(b, **{name: getattr(mod, name) for name in LANGEVIN_OPS})
