"""The Triton backend of fused_flat: ``backend()`` returns the perturb / update ops as a Backend.

Kernels (one per file): ``perturb.py`` (theta += sigma * eps) and ``restore_and_step.py``
(the fused restore + decay + momentum + Langevin + update pass), both built on the noise
helpers of ``noise.py``, which reproduce csrc/include/fused_flat/elementwise.h.

The kernels are registered as ``torch.ops.fused_flat_triton.perturb_`` and
``torch.ops.fused_flat_triton.restore_and_step_`` with ``torch.library.triton_op`` and
launched through ``torch.library.wrap_triton``, so ``torch.compile`` traces into them.
(Under ``TRITON_INTERPRET=1`` wrap_triton returns the interpreted kernel itself and the
ops run eagerly on CPU tensors; no fallback is needed.)

The Python entry points ``perturb_`` / ``restore_and_step_`` have the signatures of
fused_flat.backends.reference. They compute the Philox key and the bucket word on the host
(noise.noise_key), pick the constexpr switches, and hand fp64 buckets to
fused_flat.backends.reference (the kernels compute in fp32; an fp64 bucket keeps fp64 arithmetic,
as the C++ backend does, through the reference).

Devices: CUDA; also CPU when ``TRITON_INTERPRET=1`` (so the test-suite can run the
optimizers with backend='triton' without a GPU).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the install
    raise ImportError(f"fused_flat.backends.triton needs Triton ({type(exc).__name__}: {exc}); it ships with "
                      f"CUDA builds of torch, or `pip install triton`") from exc

import torch
from torch.library import triton_op, wrap_triton

from fused_flat import backends
from fused_flat.backends import reference
from fused_flat.noise import TAG_LIMIT, check_bucket_id
from fused_flat.backends.triton import perturb as _perturb
from fused_flat.backends.triton import restore_and_step as _rs
from fused_flat.backends.triton.noise import MASK32, noise_key

__all__ = ["backend", "perturb_", "restore_and_step_", "perturb_from_", "interpreted"]


def interpreted() -> bool:
    """Whether the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------ torch.library ops
@triton_op("fused_flat_triton::perturb_", mutates_args={"param"})
def _perturb_op(param: torch.Tensor, key: int, bw: int, step_lo: int, tag: int, sigma: float,
                offset: int) -> None:
    n = param.numel()
    wrap_triton(_perturb.perturb_kernel)[_perturb.grid(n, offset)](
        param, key, bw, step_lo, tag, sigma, offset, n,
        MIS=offset & 3, BLOCK=_perturb.BLOCK, num_warps=_perturb.NUM_WARPS)


@triton_op("fused_flat_triton::restore_and_step_", mutates_args={"param", "momentum_buffer"})
def _restore_and_step_op(param: torch.Tensor, grad: torch.Tensor,
                         momentum_buffer: Optional[torch.Tensor],
                         grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                         key: int, bw: int, step_lo: int, offset: int, restore_tag: int,
                         sigma: float,
                         lr: float, weight_decay: float, momentum: float, dampening: float,
                         nesterov: bool, momentum_init: bool, noise_std: float,
                         grad_mult: float, stochastic_rounding: bool = False) -> None:
    n = param.numel()
    need_eps, need_xi = sigma != 0.0, noise_std != 0.0
    sr = bool(stochastic_rounding) and param.dtype in (torch.bfloat16, torch.float16)
    wrap_triton(_rs.restore_and_step_kernel)[_rs.grid(n, offset)](
        param, grad, momentum_buffer, grad_scale, found_inf,
        key, bw, step_lo, offset, n, restore_tag,
        sigma, lr, weight_decay, momentum, dampening, noise_std, grad_mult, int(momentum_init),
        HAS_MOM=momentum_buffer is not None, NESTEROV=bool(nesterov) and momentum_buffer is not None,
        NEED_EPS=need_eps, NEED_XI=need_xi,
        HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
        MIS=offset & 3, BLOCK=_rs.BLOCK, num_warps=_rs.NUM_WARPS,
        SR=sr, EPS_TAG0=sr and need_eps and restore_tag == 0,
        IS_BF16=param.dtype == torch.bfloat16)


@triton_op("fused_flat_triton::perturb_from_", mutates_args={"param"})
def _perturb_from_op(param: torch.Tensor, master: torch.Tensor, key: int, bw: int, step_lo: int,
                     tag: int, sigma: float, offset: int) -> None:
    n = param.numel()
    wrap_triton(_perturb.perturb_from_kernel)[_perturb.grid(n, offset)](
        param, master, key, bw, step_lo, tag, sigma, offset, n, NEED_EPS=sigma != 0.0,
        IS_BF16=param.dtype == torch.bfloat16,
        MIS=offset & 3, BLOCK=_perturb.BLOCK, num_warps=_perturb.NUM_WARPS)


# ------------------------------------------------------------------ argument checks
def _check_bucket(t: torch.Tensor, name: str) -> None:
    if t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"fused_flat.backends.triton: {name} must be a contiguous 1-D bucket, got shape "
                         f"{tuple(t.shape)} strides {t.stride()}")
    if not t.is_floating_point():
        raise ValueError(f"fused_flat.backends.triton: {name} must be floating point, got {t.dtype}")


def _check_like(param: torch.Tensor, other: torch.Tensor, name: str) -> None:
    _check_bucket(other, name)
    if other.numel() != param.numel() or other.dtype != param.dtype or other.device != param.device:
        raise ValueError(f"fused_flat.backends.triton: {name} must match the parameter bucket (numel "
                         f"{param.numel()}, {param.dtype}, {param.device}); got numel {other.numel()}, "
                         f"{other.dtype}, {other.device}")


def _check_scalar(t: Optional[torch.Tensor], param: torch.Tensor, name: str) -> None:
    if t is not None and (t.numel() != 1 or t.dtype != torch.float32 or t.device != param.device):
        raise ValueError(f"fused_flat.backends.triton: {name} must be a one-element float32 tensor on "
                         f"{param.device}, got {t.numel()} elements of {t.dtype} on {t.device}")


def _check_noise_args(seed: int, bucket_id: int, offset: int, tag: int) -> None:
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"fused_flat.backends.triton: seed must be in [0, 2^63), got {seed}")
    if offset < 0:
        raise ValueError(f"fused_flat.backends.triton: offset must be >= 0, got {offset}")
    check_bucket_id(bucket_id)
    if not -1 <= tag < TAG_LIMIT:
        raise ValueError(f"fused_flat.backends.triton: tag must be in [-1, 256), got {tag}")


# ------------------------------------------------------------------ entry points
def perturb_(param: torch.Tensor, seed: int, bucket_id: int, step: int, tag: int, sigma: float,
             offset: int = 0) -> None:
    """theta <- theta + sigma * eps(tag) over elements [offset, offset + numel) of the bucket."""
    _check_bucket(param, "param")
    _check_noise_args(seed, bucket_id, offset, tag)
    if tag < 0:
        raise ValueError(f"fused_flat.backends.triton.perturb_: tag must be >= 0, got {tag}")
    if sigma == 0.0 or param.numel() == 0:
        return
    if param.dtype == torch.float64:   # fp64 keeps fp64 arithmetic: the reference does it
        reference.perturb_(param, seed, bucket_id, step, tag, sigma, offset)
        return
    torch.ops.fused_flat_triton.perturb_(param, *noise_key(seed, bucket_id), step & MASK32,
                                         tag, float(sigma), int(offset))


def restore_and_step_(param: torch.Tensor, grad: torch.Tensor, momentum_buffer: torch.Tensor | None,
                      grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None, seed: int,
                      bucket_id: int, step: int, offset: int, restore_tag: int, sigma: float,
                      lr: float, weight_decay: float, momentum: float, dampening: float,
                      nesterov: bool, momentum_init: bool, noise_std: float, grad_mult: float,
                      stochastic_rounding: bool = False) -> None:
    """The fused restore + decay + momentum + Langevin + update pass (see fused_flat.backends.reference);
    ``stochastic_rounding``: bf16/fp16 params get the SR of the fp32 result (ignored for
    fp32/fp64)."""
    _check_bucket(param, "param")
    _check_like(param, grad, "grad")
    if momentum_buffer is not None:
        _check_like(param, momentum_buffer, "momentum_buffer")
    _check_scalar(grad_scale, param, "grad_scale")
    _check_scalar(found_inf, param, "found_inf")
    _check_noise_args(seed, bucket_id, offset, restore_tag)
    if restore_tag < 0 and sigma != 0.0:
        raise ValueError("fused_flat.backends.triton.restore_and_step_: restore_tag must be >= 0 when sigma != 0")
    if param.numel() == 0:
        return
    if param.dtype == torch.float64:
        reference.restore_and_step_(param, grad, momentum_buffer, grad_scale, found_inf, seed,
                                    bucket_id, step, offset, restore_tag, sigma, lr, weight_decay,
                                    momentum, dampening, nesterov, momentum_init, noise_std, grad_mult,
                                    stochastic_rounding)
        return
    torch.ops.fused_flat_triton.restore_and_step_(
        param, grad, momentum_buffer, grad_scale, found_inf, *noise_key(seed, bucket_id),
        step & MASK32, int(offset), max(int(restore_tag), 0), float(sigma), float(lr),
        float(weight_decay), float(momentum), float(dampening), bool(nesterov), bool(momentum_init),
        float(noise_std), float(grad_mult), bool(stochastic_rounding))


def perturb_from_(param: torch.Tensor, master: torch.Tensor, seed: int, bucket_id: int, step: int,
                  tag: int, sigma: float, offset: int = 0) -> None:
    """param <- round-to-nearest(master + sigma * eps(tag)): fp32 master, bf16/fp16/fp32
    param, fp32 math (fused_flat.backends.reference.perturb_from_)."""
    _check_bucket(param, "param")
    _check_bucket(master, "master")
    if master.dtype != torch.float32 or master.numel() != param.numel() or master.device != param.device:
        raise ValueError(f"fused_flat.backends.triton.perturb_from_: master must be float32 with the param's "
                         f"numel ({param.numel()}) on {param.device}, got {master.dtype} numel "
                         f"{master.numel()} on {master.device}")
    if param.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"fused_flat.backends.triton.perturb_from_: param must be bf16, fp16 or fp32, got {param.dtype}")
    _check_noise_args(seed, bucket_id, offset, tag)
    if tag < 0:
        raise ValueError(f"fused_flat.backends.triton.perturb_from_: tag must be >= 0, got {tag}")
    if param.numel() == 0:
        return
    torch.ops.fused_flat_triton.perturb_from_(param, master, *noise_key(seed, bucket_id),
                                              step & MASK32, tag, float(sigma), int(offset))


def backend() -> backends.Backend:
    """The 'triton' Backend: CUDA tensors (and CPU tensors under TRITON_INTERPRET=1)."""
    devices = ("cuda", "cpu") if interpreted() else ("cuda",)
    from fused_flat.backends.triton import multi, sam

    b = backends.with_sam_lists(backends.lift("triton", devices, perturb_, restore_and_step_,
                                              perturb_from_=perturb_from_), sam)
    b = backends.with_langevin_lists(b, multi)   # one launch per bucket per pass
    # the list kernels read step / lr / noise_std from device tensors (capturable=True)
    return dataclasses.replace(b, device_scalars=True)
