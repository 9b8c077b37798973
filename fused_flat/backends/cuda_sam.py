"""The multi-tensor SAM-family ops on CUDA (``torch.ops.fused_flat.sam_*_multi``), with list
signatures: one kernel launch per bucket per pass.

    sam_grad_sq_norm(grads, params|None, eta) -> 0-dim float64 tensor on the device
    sam_perturb_(params, grads, backups, adaptive, coef, eta)
    sam_restore_and_step_(params, backups, grads, moms|None, grad_scale, found_inf, lr,
                          weight_decay, momentum, dampening, nesterov, momentum_init, grad_mult,
                          stochastic_rounding=False, seed=0, bucket_id=0, step=0, offsets=None)
    sam_probe_(params, backups, offsets, seed, bucket_id, step, delta)

Lists hold 1-D contiguous CUDA tensors of one dtype (fp32/bf16/fp16/fp64); the math is
fused_flat/backends/sam_reference.py's (kernels: csrc/cuda/sam_cuda.cu on
csrc/include/fused_flat/sam_elementwise.h). ``coef`` may be a Python float or a 1-element
device tensor (read by the kernel, so the global norm never leaves the GPU); ``grad_scale`` /
``found_inf`` are read by the kernel. No call synchronises with the host.

Each pass is ONE registered torch op (opaque; namespace ``fused_flat_cuda``:
``sam_grad_sq_norm_list``, ``sam_perturb_list_``, ``sam_restore_and_step_list_``,
``sam_probe_list_``; fused_flat.backends.multi_tensor.register_list_op), called by these Python entry
points after the argument checks (metadata only): its real implementation builds one
launch's tables (fused_flat.backends.multi_tensor.launch_tables: pinned staging, non-blocking copy,
capture-owned while a CUDA graph is captured) and calls the compiled op once; its fake implementation
touches nothing on the host (no host read on fake tensors, one node per pass under
torch.compile). The table building runs only in the real implementation, which fake tensors
cannot reach: tests/test_gpu_sync.py checks it on a GPU (``make gpu-check``).

Device-resident per-step scalars (CUDA-graph capture, ``capturable=True``): the ``lr`` of
``sam_restore_and_step_`` may be a one-element float64 (or float32) tensor, and the ``step``
of its stochastic rounding and of ``sam_probe_`` a one-element int64 tensor, on the params'
device: read by the kernel when it runs, never on the host, converted as the scalar path
converts ``float(t)`` / ``int(t)`` (bit-identical results; fused_flat.backends.cuda).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from fused_flat.backends import _native
from fused_flat.backends import cuda_arch
from fused_flat.backends import multi_tensor as mt
from fused_flat.backends.cuda import _FLOAT_DTYPES, _STEP_DTYPES, _host, device_scalar

CHUNK = 1 << 14   # elements per CUDA block: 16 x (256 threads x 4 fp32) or 8 x (x 8 bf16)


def available() -> bool:
    return _native.available() and hasattr(torch.ops.fused_flat, "sam_perturb_multi_")


def _ops():
    if not _native.available():
        raise RuntimeError(f"fused_flat: the compiled extension is not available "
                           f"({_native.load_error}); {_native.BUILD_HINT}")
    if not hasattr(torch.ops.fused_flat, "sam_perturb_multi_"):
        raise RuntimeError("fused_flat: the extension was built without the CUDA multi-tensor ops "
                           f"(no nvcc, or FORCE_CUDA=0); {_native.BUILD_HINT} with CUDA_HOME set")
    return torch.ops.fused_flat


def _check_device(ref: torch.Tensor) -> torch.device:
    device = ref.device
    if device.type != "cuda":
        raise ValueError(f"fused_flat.backends.cuda_sam: CUDA tensors only, got {device}; use "
                         f"fused_flat.backends.triton.sam, fused_flat.backends.cpp_sam or fused_flat.backends.sam_reference")
    return device


def _tables(lists, offsets=None):
    """One launch's tables (inside the real implementations only: it reads data pointers)."""
    cuda_arch.check_device(lists[0][0].device)   # a clear error if the build cannot run here
    return mt.launch_tables(lists, CHUNK, offsets)


# ------------------------------------------------------------------ the registered ops
_LIB = torch.library.Library("fused_flat_cuda", "FRAGMENT")   # shared with cuda_multi.py


def _no_output(*args):
    return None


def _sq_norm_list(grads: List[torch.Tensor], params: List[torch.Tensor],
                  eta: float) -> torch.Tensor:
    """``params`` empty: plain SAM; else ASAM's (|theta| + eta) g."""
    with mt.launching(grads[0].device):
        tb = _tables([grads] + ([params] if params else []))
        return _ops().sam_grad_sq_norm_multi(grads, params, tb.chunks, tb.meta, tb.ptrs,
                                             tb.chunk, eta)


def _sq_norm_list_fake(grads, params, eta):
    return grads[0].new_empty((), dtype=torch.float64)


SQ_NORM_LIST = mt.register_list_op(
    _LIB, "sam_grad_sq_norm_list(Tensor[] grads, Tensor[] params, float eta) -> Tensor",
    _sq_norm_list, _sq_norm_list_fake)


def _perturb_list(params: List[torch.Tensor], grads: List[torch.Tensor],
                  backups: List[torch.Tensor], adaptive: bool, coef: float,
                  coef_t: Optional[torch.Tensor], eta: float) -> None:
    with mt.launching(params[0].device):
        tb = _tables([params, grads, backups])
        _ops().sam_perturb_multi_(params, grads, backups, tb.chunks, tb.meta, tb.ptrs, tb.chunk,
                                  adaptive, coef, coef_t, eta)


PERTURB_LIST = mt.register_list_op(
    _LIB, "sam_perturb_list_(Tensor(a0!)[] params, Tensor[] grads, Tensor(a2!)[] backups, "
          "bool adaptive, float coef, Tensor? coef_t, float eta) -> ()",
    _perturb_list, _no_output)


def _restore_and_step_list(params: List[torch.Tensor], backups: List[torch.Tensor],
                           grads: List[torch.Tensor], moms: List[torch.Tensor],
                           grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                           lr: float, lr_t: Optional[torch.Tensor], weight_decay: float,
                           momentum: float, dampening: float, nesterov: bool,
                           momentum_init: bool, grad_mult: float, stochastic_rounding: bool,
                           seed: int, bucket_id: int, step: int, step_t: Optional[torch.Tensor],
                           offsets: Optional[List[int]]) -> None:
    """``moms`` empty: no momentum buffers; ``offsets``: those of the stochastic rounding."""
    with mt.launching(params[0].device):
        lists = [params, backups, grads] + ([moms] if moms else [])
        tb = _tables(lists, offsets if stochastic_rounding else None)
        _ops().sam_restore_and_step_multi_(
            params, backups, grads, moms, grad_scale, found_inf, tb.chunks, tb.meta, tb.ptrs,
            tb.chunk, lr, weight_decay, momentum, dampening, nesterov, momentum_init, grad_mult,
            stochastic_rounding, seed, bucket_id, step, lr_t, step_t)


RESTORE_AND_STEP_LIST = mt.register_list_op(
    _LIB, "sam_restore_and_step_list_(Tensor(a0!)[] params, Tensor[] backups, Tensor[] grads, "
          "Tensor(a3!)[] moms, Tensor? grad_scale, Tensor? found_inf, float lr, Tensor? lr_t, "
          "float weight_decay, float momentum, float dampening, bool nesterov, "
          "bool momentum_init, float grad_mult, bool stochastic_rounding, SymInt seed, "
          "SymInt bucket_id, SymInt step, Tensor? step_t, SymInt[]? offsets) -> ()",
    _restore_and_step_list, _no_output)


def _probe_list(params: List[torch.Tensor], backups: List[torch.Tensor], offsets: List[int],
                seed: int, bucket_id: int, step: int, step_t: Optional[torch.Tensor],
                delta: float) -> None:
    with mt.launching(params[0].device):
        tb = _tables([params, backups], offsets)
        _ops().sam_probe_multi_(params, backups, tb.chunks, tb.meta, tb.ptrs, tb.chunk, seed,
                                bucket_id, step, delta, step_t)


PROBE_LIST = mt.register_list_op(
    _LIB, "sam_probe_list_(Tensor(a0!)[] params, Tensor(a1!)[] backups, SymInt[] offsets, "
          "SymInt seed, SymInt bucket_id, SymInt step, Tensor? step_t, float delta) -> ()",
    _probe_list, _no_output)


# ------------------------------------------------------------------ entry points
def sam_grad_sq_norm(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor] | None,
                     eta: float) -> torch.Tensor:
    """sum_i t_i^2, float64 0-dim on the device; t = g, or (|theta| + eta) g (ASAM). One call
    of the op ``fused_flat_cuda::sam_grad_sq_norm_list``."""
    mt.check_lists("sam_grad_sq_norm", "grads", grads, params=params)
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    _check_device(grads[0])
    _ops()
    return SQ_NORM_LIST(
        list(grads), list(params) if params is not None else [], float(eta))


def sam_perturb_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                 backups: Sequence[torch.Tensor], adaptive: bool, coef: float | torch.Tensor,
                 eta: float) -> None:
    """backup <- theta ; theta <- theta + (coef * s) * g, s = (|theta| + eta)^2 if adaptive.
    One call of the op ``fused_flat_cuda::sam_perturb_list_``."""
    mt.check_lists("sam_perturb_", "params", params, grads=grads, backups=backups)
    if not params:
        return
    _check_device(params[0])
    coef_t = None
    if isinstance(coef, torch.Tensor):
        coef_t = coef.reshape(()).to(torch.float64)   # device op (no-op for float64): no sync
        coef = 0.0
    _ops()
    PERTURB_LIST(list(params), list(grads), list(backups), bool(adaptive), float(coef), coef_t,
                 float(eta))


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
    tensors (module docstring). One call of the op ``fused_flat_cuda::sam_restore_and_step_list_``."""
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
    _ops()
    RESTORE_AND_STEP_LIST(
        list(params), list(backups), list(grads), list(moms) if moms is not None else [],
        grad_scale, found_inf, _host(lr, lr_t, float), lr_t, float(weight_decay),
        float(momentum), float(dampening), bool(nesterov), bool(momentum_init),
        float(grad_mult), sr, int(seed), int(bucket_id), _host(step, step_t, int), step_t,
        [int(o) for o in offsets] if offsets is not None else None)


def sam_probe_(params: Sequence[torch.Tensor], backups: Sequence[torch.Tensor],
               offsets: Sequence[int], seed: int, bucket_id: int, step: int | torch.Tensor,
               delta: float) -> None:
    """backup <- theta ; theta <- theta + delta * v (Rademacher, tag 16, layout 3) at bucket
    index offsets[t] + e. ``step`` may be a one-element int64 device tensor. One call of the
    op ``fused_flat_cuda::sam_probe_list_``."""
    mt.check_lists("sam_probe_", "params", params, backups=backups)
    if len(offsets) != len(params):
        raise ValueError(f"sam_probe_: {len(offsets)} offsets for {len(params)} tensors")
    if not params:
        return
    _check_device(params[0])
    step_t = device_scalar("cuda_sam.sam_probe_", "step", step, params[0].device, _STEP_DTYPES)
    _ops()
    PROBE_LIST(list(params), list(backups), [int(o) for o in offsets], int(seed), int(bucket_id),
               _host(step, step_t, int), step_t, float(delta))


if available():

    @torch.library.register_fake("fused_flat::sam_grad_sq_norm_multi")
    def _sq_norm_fake(grads, params, chunks, meta, ptrs, chunk, eta):
        return torch.empty((), dtype=torch.float64, device=grads[0].device)

    @torch.library.register_fake("fused_flat::sam_perturb_multi_")
    def _perturb_fake(params, grads, backups, chunks, meta, ptrs, chunk, adaptive, coef,
                      coef_tensor, eta):
        return None

    @torch.library.register_fake("fused_flat::sam_restore_and_step_multi_")
    def _step_fake(params, backups, grads, moms, grad_scale, found_inf, chunks, meta, ptrs,
                   chunk, lr, weight_decay, momentum, dampening, nesterov, momentum_init,
                   grad_mult, stochastic_rounding=False, seed=0, bucket_id=0, step=0, lr_t=None,
                   step_t=None):
        return None

    @torch.library.register_fake("fused_flat::sam_probe_multi_")
    def _probe_fake(params, backups, chunks, meta, ptrs, chunk, seed, bucket_id, step, delta,
                    step_t=None):
        return None
