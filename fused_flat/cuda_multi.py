"""The multi-tensor Langevin ops on CUDA (``torch.ops.fused_flat.*_multi``), with the Backend
list signatures: one kernel launch per bucket per pass (issue 12).

    perturb_(params, offsets, seed, bucket_id, step, tag, sigma)
    restore_and_step_(params, grads, moms|None, offsets, grad_scale, found_inf, seed,
                      bucket_id, step, restore_tag, sigma, lr, weight_decay, momentum,
                      dampening, nesterov, momentum_init, noise_std, grad_mult,
                      stochastic_rounding=False)
    all_finite(tensors) -> float32 [1] on the device (1.0 if any inf/NaN), one launch

Lists hold 1-D contiguous CUDA tensors of one dtype (fp32/bf16/fp16/fp64); the math and the
noise are the per-tensor ops' (fused_flat.ops; kernels csrc/cuda/multi_langevin.cu on
csrc/include/fused_flat/elementwise.h; oracle fused_flat.reference per tensor at its
offset). The Langevin tables are built for the call frame (fused_flat.multi_tensor.
frame_plan), cached on the device: no host-to-device copy once warm. ``grad_scale`` /
``found_inf`` are read by the kernels; no call synchronises with the host. all_finite
keeps a persistent zeroed int32 [2] scratch per (device, stream) (see the .cu).

``stochastic_rounding=True``: SR is being added to the per-tensor kernels and to
elementwise.h separately; until it lands in these kernels, an SR call falls back to the
per-tensor ops (fused_flat.ops.restore_and_step_, one launch per tensor).
TODO(issue 12): switch to the multi-tensor kernel once the SR helper is merged.
"""
from __future__ import annotations

import inspect
from typing import Sequence

import torch

from fused_flat import _native, cuda_arch
from fused_flat import multi_tensor as mt

CHUNK = 1 << 14   # frame positions per CUDA block: 16 x (256 threads x 4 fp32) or 8 x (x 8 bf16)


def available() -> bool:
    return _native.available() and hasattr(torch.ops.fused_flat, "perturb_multi_")


def _ops():
    if not available():
        raise RuntimeError("fused_flat: the extension was built without the CUDA multi-tensor "
                           f"Langevin ops; {_native.BUILD_HINT} with CUDA_HOME set")
    return torch.ops.fused_flat


def _device(ref: torch.Tensor) -> torch.device:
    device = ref.device
    if device.type != "cuda":
        raise ValueError(f"fused_flat.cuda_multi: CUDA tensors only, got {device}; use "
                         f"fused_flat.triton.multi, fused_flat.ops or fused_flat.reference")
    if not mt.tracing(ref):
        cuda_arch.check_device(device)   # a clear error if the build cannot run on this GPU
    return device


def _check_offsets(what, params, offsets):
    if len(offsets) != len(params):
        raise ValueError(f"{what}: {len(offsets)} offsets for {len(params)} tensors")
    if any(int(o) < 0 for o in offsets):
        raise ValueError(f"{what}: offsets must be >= 0")


def perturb_(params: Sequence[torch.Tensor], offsets: Sequence[int], seed: int, bucket_id: int,
             step: int, tag: int, sigma: float) -> None:
    """theta <- theta + sigma * eps(tag), eps at bucket indices offsets[t] + e."""
    mt.check_lists("perturb_", "params", params)
    _check_offsets("perturb_", params, offsets)
    if sigma == 0.0 or not params:
        return
    device = _device(params[0])
    if mt.tracing(params[0]):
        p, ptrs = mt.placeholder_tables(1, len(params), CHUNK, device)
    else:
        p = mt.frame_plan([t.numel() for t in params], offsets, CHUNK, device)
        ptrs = mt.pointer_table([list(params)], device)
    _ops().perturb_multi_(list(params), p.chunks, p.meta, ptrs, p.chunk, int(seed),
                          int(bucket_id), int(step), int(tag), float(sigma))


def _per_tensor_restore_and_step(params, grads, moms, offsets, args):
    """SR fallback: the per-tensor op, one launch per tensor (module docstring)."""
    from fused_flat import ops

    fn = ops.restore_and_step_
    if "stochastic_rounding" not in inspect.signature(fn).parameters:
        raise NotImplementedError("fused_flat.cuda_multi: stochastic_rounding=True needs the "
                                  "per-tensor SR kernels, which this build does not have yet")
    (grad_scale, found_inf, seed, bucket_id, step, restore_tag, sigma, lr, weight_decay,
     momentum, dampening, nesterov, momentum_init, noise_std, grad_mult) = args
    for t, (p, g, off) in enumerate(zip(params, grads, offsets)):
        fn(p, g, None if moms is None else moms[t], grad_scale, found_inf, seed, bucket_id, step,
           int(off), restore_tag, sigma, lr, weight_decay, momentum, dampening, nesterov,
           momentum_init, noise_std, grad_mult, stochastic_rounding=True)


def restore_and_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                      moms: Sequence[torch.Tensor] | None, offsets: Sequence[int],
                      grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None, seed: int,
                      bucket_id: int, step: int, restore_tag: int, sigma: float, lr: float,
                      weight_decay: float, momentum: float, dampening: float, nesterov: bool,
                      momentum_init: bool, noise_std: float, grad_mult: float,
                      stochastic_rounding: bool = False) -> None:
    """The fused restore + decay + momentum + Langevin + update pass over a tensor list."""
    mt.check_lists("restore_and_step_", "params", params, grads=grads, moms=moms)
    _check_offsets("restore_and_step_", params, offsets)
    if not params:
        return
    if stochastic_rounding:
        _per_tensor_restore_and_step(params, grads, moms, offsets, (
            grad_scale, found_inf, seed, bucket_id, step, restore_tag, sigma, lr, weight_decay,
            momentum, dampening, nesterov, momentum_init, noise_std, grad_mult))
        return
    device = _device(params[0])
    lists = [list(params), list(grads)] + ([list(moms)] if moms is not None else [])
    if mt.tracing(params[0]):
        p, ptrs = mt.placeholder_tables(len(lists), len(params), CHUNK, device)
    else:
        p = mt.frame_plan([t.numel() for t in params], offsets, CHUNK, device)
        ptrs = mt.pointer_table(lists, device)
    _ops().restore_and_step_multi_(
        list(params), list(grads), list(moms) if moms is not None else [], grad_scale, found_inf,
        p.chunks, p.meta, ptrs, p.chunk, int(seed), int(bucket_id), int(step), int(restore_tag),
        float(sigma), float(lr), float(weight_decay), float(momentum), float(dampening),
        bool(nesterov), bool(momentum_init), float(noise_std), float(grad_mult))


_scratch: dict = {}


def _scratch_for(device: torch.device) -> torch.Tensor:
    key = (device.index, torch.cuda.current_stream(device).stream_id)
    s = _scratch.get(key)
    if s is None:
        s = _scratch[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return s


def all_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """found_inf: float32 [1] on the device, 1.0 if any element is inf or NaN; one launch."""
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(1, dtype=torch.float32)
    if not all(t.dim() == 1 and t.is_contiguous() and t.dtype == tensors[0].dtype
               and t.device == tensors[0].device for t in tensors):
        from fused_flat import reference

        return reference.all_finite(tensors)
    device = _device(tensors[0])
    if mt.tracing(tensors[0]):
        p, ptrs = mt.placeholder_tables(1, len(tensors), CHUNK, device)
        scratch = torch.zeros(2, dtype=torch.int32, device=device)
        return _ops().all_finite_multi(tensors, p.chunks, p.meta, ptrs, p.chunk, scratch)
    p = mt.plan([t.numel() for t in tensors], CHUNK, device)
    if p.n_chunks == 0:
        return torch.zeros(1, dtype=torch.float32, device=device)
    ptrs = mt.pointer_table([tensors], device)
    return _ops().all_finite_multi(tensors, p.chunks, p.meta, ptrs, p.chunk, _scratch_for(device))


if available():

    @torch.library.register_fake("fused_flat::perturb_multi_")
    def _perturb_fake(params, chunks, meta, ptrs, chunk, seed, bucket_id, step, tag, sigma):
        return None

    @torch.library.register_fake("fused_flat::restore_and_step_multi_")
    def _step_fake(params, grads, moms, grad_scale, found_inf, chunks, meta, ptrs, chunk, seed,
                   bucket_id, step, restore_tag, sigma, lr, weight_decay, momentum, dampening,
                   nesterov, momentum_init, noise_std, grad_mult):
        return None

    @torch.library.register_fake("fused_flat::all_finite_multi")
    def _all_finite_fake(tensors, chunks, meta, ptrs, chunk, scratch):
        return torch.empty(1, dtype=torch.float32, device=tensors[0].device)
