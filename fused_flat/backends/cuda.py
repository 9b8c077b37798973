"""The multi-tensor Langevin ops on CUDA (``torch.ops.fused_flat.*_multi``), with the Backend
list signatures: one kernel launch per bucket per pass (issue 12).

    perturb_(params, offsets, seed, bucket_id, step, tag, sigma)
    restore_and_step_(params, grads, moms|None, offsets, grad_scale, found_inf, seed,
                      bucket_id, step, restore_tag, sigma, lr, weight_decay, momentum,
                      dampening, nesterov, momentum_init, noise_std, grad_mult,
                      stochastic_rounding=False)
    all_finite(tensors) -> float32 [1] on the device (1.0 if any inf/NaN), one launch

Lists hold 1-D contiguous CUDA tensors of one dtype (fp32/bf16/fp16/fp64); the math and the
noise are the per-tensor ops' (fused_flat.backends.cpp; kernels csrc/cuda/multi_langevin.cu on
csrc/include/fused_flat/elementwise.h; oracle fused_flat.backends.reference per tensor at its
offset). ``grad_scale`` / ``found_inf`` are read by the kernels; no call synchronises with
the host. all_finite keeps a persistent zeroed int32 [2] scratch per (device, stream) (see
the .cu).

Each pass is ONE registered torch op (opaque; namespace ``fused_flat_cuda``:
``perturb_list_``, ``restore_and_step_list_``, ``all_finite_list``;
fused_flat.backends.multi_tensor.register_list_op: Library.define + impl + register_fake),
called by these Python entry points after the argument checks (metadata only). Its real
implementation builds the launch tables for the call frame
(fused_flat.backends.multi_tensor.launch_tables, frame=True: pinned staging buffer, non-blocking
copy, owned by the call or, while a CUDA graph is captured, by the process) and calls the
compiled op (``torch.ops.fused_flat.*_multi``) once; its fake implementation touches nothing
on the host. So a step on fake CUDA tensors makes no host read and a compiled step holds one
node per pass; the table building runs only in the real implementation, which fake tensors
cannot reach: tests/test_gpu_sync.py checks it on a GPU (``make gpu-check``).

``stochastic_rounding=True`` (bf16/fp16 params; ignored for fp32/fp64): the same one launch,
theta stored stochastically rounded with the rbits of ALGORITHMS.md §1 (tags 0 and 32 of
(seed, bucket_id, step) at bucket index offsets[t] + e), the per-tensor SR kernel's and the
CPU kernels' per-element math (elementwise.h): bit-identical results.

Device-resident per-step scalars (CUDA-graph capture, ``capturable=True``): ``step`` may be a
Python int or a one-element int64 tensor on the params' device; ``lr`` and ``noise_std`` (of
``restore_and_step_``) a Python float or a one-element float64 (or float32) tensor there.
A tensor is read by the kernel from device memory when it runs (a captured graph replays
with the tensor's current value); nothing is read on the host. The kernel converts it as
the scalar path converts the Python number (``float(t)`` / ``int(t)``; the step's low 32 bits
enter the Philox counter): bit-identical results. A tensor ``noise_std`` always draws xi:
pass the float 0.0 for a pass without Langevin noise. (A result that is exactly zero may
then differ in the sign of the zero from the scalar path's, -0.0 + 0 * xi.)
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from fused_flat.backends import _native
from fused_flat.backends import cuda_arch
from fused_flat.backends import multi_tensor as mt

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
        raise ValueError(f"fused_flat.backends.cuda: CUDA tensors only, got {device}; use "
                         f"fused_flat.backends.triton.multi, fused_flat.backends.cpp or fused_flat.backends.reference")
    return device


def _check_offsets(what, params, offsets):
    if len(offsets) != len(params):
        raise ValueError(f"{what}: {len(offsets)} offsets for {len(params)} tensors")
    if any(int(o) < 0 for o in offsets):
        raise ValueError(f"{what}: offsets must be >= 0")


_STEP_DTYPES = (torch.int64,)
_FLOAT_DTYPES = (torch.float64, torch.float32)


def device_scalar(what: str, name: str, value, device: torch.device, dtypes: tuple):
    """``value`` as a device-resident per-step scalar: None for a Python number (the scalar
    path), the tensor itself after checking it is a one-element tensor of ``dtypes`` on
    ``device`` (metadata only: no host read, so it traces under FakeTensorMode)."""
    if not isinstance(value, torch.Tensor):
        return None
    kinds = " or ".join(str(d).replace("torch.", "") for d in dtypes)
    number = "int" if dtypes == _STEP_DTYPES else "float"
    if value.dtype not in dtypes or value.numel() != 1 or value.device != device:
        raise ValueError(f"fused_flat.{what}: {name} must be a Python {number} or a "
                         f"one-element {kinds} tensor on {device} (read by the kernel, no host "
                         f"sync); got a {value.dtype} tensor of {value.numel()} elements on "
                         f"{value.device}")
    return value


def _host(value, tensor, cast):
    """The scalar argument of an op: the Python number, or 0 when the tensor replaces it."""
    return cast(0) if tensor is not None else cast(value)


# ------------------------------------------------------------------ the registered ops
# The real implementations build one launch's tables (fused_flat.backends.multi_tensor) and call the
# compiled op; the fakes touch nothing on the host (module docstring).
_LIB = torch.library.Library("fused_flat_cuda", "FRAGMENT")   # shared with cuda_sam.py


def _no_output(*args):
    return None


def _perturb_list(params: List[torch.Tensor], offsets: List[int], seed: int, bucket_id: int,
                  step: int, step_t: Optional[torch.Tensor], tag: int, sigma: float) -> None:
    device = params[0].device
    cuda_arch.check_device(device)   # a clear error if the build cannot run on this GPU
    with mt.launching(device):
        tb = mt.launch_tables([params], CHUNK, offsets, frame=True)
        _ops().perturb_multi_(params, tb.chunks, tb.meta, tb.ptrs, tb.chunk, seed, bucket_id,
                              step, tag, sigma, step_t)


PERTURB_LIST = mt.register_list_op(
    _LIB, "perturb_list_(Tensor(a0!)[] params, SymInt[] offsets, SymInt seed, SymInt bucket_id, "
          "SymInt step, Tensor? step_t, SymInt tag, float sigma) -> ()",
    _perturb_list, _no_output)


def _restore_and_step_list(params: List[torch.Tensor], grads: List[torch.Tensor],
                           moms: List[torch.Tensor], offsets: List[int],
                           grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                           seed: int, bucket_id: int, step: int, step_t: Optional[torch.Tensor],
                           restore_tag: int, sigma: float, lr: float,
                           lr_t: Optional[torch.Tensor], weight_decay: float, momentum: float,
                           dampening: float, nesterov: bool, momentum_init: bool,
                           noise_std: float, noise_std_t: Optional[torch.Tensor],
                           grad_mult: float, stochastic_rounding: bool) -> None:
    """``moms`` empty: no momentum buffers."""
    device = params[0].device
    cuda_arch.check_device(device)
    with mt.launching(device):
        lists = [params, grads] + ([moms] if moms else [])
        tb = mt.launch_tables(lists, CHUNK, offsets, frame=True)
        _ops().restore_and_step_multi_(
            params, grads, moms, grad_scale, found_inf, tb.chunks, tb.meta, tb.ptrs, tb.chunk,
            seed, bucket_id, step, restore_tag, sigma, lr, weight_decay, momentum, dampening,
            nesterov, momentum_init, noise_std, grad_mult, stochastic_rounding, step_t, lr_t,
            noise_std_t)


RESTORE_AND_STEP_LIST = mt.register_list_op(
    _LIB, "restore_and_step_list_(Tensor(a0!)[] params, Tensor[] grads, Tensor(a2!)[] moms, "
          "SymInt[] offsets, Tensor? grad_scale, Tensor? found_inf, SymInt seed, "
          "SymInt bucket_id, SymInt step, Tensor? step_t, SymInt restore_tag, float sigma, "
          "float lr, Tensor? lr_t, float weight_decay, float momentum, float dampening, "
          "bool nesterov, bool momentum_init, float noise_std, Tensor? noise_std_t, "
          "float grad_mult, bool stochastic_rounding) -> ()",
    _restore_and_step_list, _no_output)


_scratch: dict = {}


def _scratch_for(device: torch.device) -> torch.Tensor:
    """all_finite's persistent zeroed int32 [2] per (device, stream), held for the process (a
    graph captured with it keeps reading it)."""
    key = (device.index, torch.cuda.current_stream(device).stream_id)
    s = _scratch.get(key)
    if s is None:
        s = _scratch[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return s


def _all_finite_list(tensors: List[torch.Tensor]) -> torch.Tensor:
    device = tensors[0].device
    cuda_arch.check_device(device)
    with mt.launching(device):
        tb = mt.launch_tables([tensors], CHUNK)
        if tb.n_chunks == 0:
            return torch.zeros(1, dtype=torch.float32, device=device)
        return _ops().all_finite_multi(tensors, tb.chunks, tb.meta, tb.ptrs, tb.chunk,
                                       _scratch_for(device))


def _all_finite_list_fake(tensors):
    return tensors[0].new_empty(1, dtype=torch.float32)


ALL_FINITE_LIST = mt.register_list_op(
    _LIB, "all_finite_list(Tensor[] tensors) -> Tensor", _all_finite_list, _all_finite_list_fake)


# ------------------------------------------------------------------ entry points
def perturb_(params: Sequence[torch.Tensor], offsets: Sequence[int], seed: int, bucket_id: int,
             step: int | torch.Tensor, tag: int, sigma: float) -> None:
    """theta <- theta + sigma * eps(tag), eps at bucket indices offsets[t] + e. ``step``: a
    Python int or a one-element int64 device tensor (module docstring). One call of the op
    ``fused_flat_cuda::perturb_list_``."""
    mt.check_lists("perturb_", "params", params)
    _check_offsets("perturb_", params, offsets)
    if not params:
        return
    device = _device(params[0])
    step_t = device_scalar("cuda_multi.perturb_", "step", step, device, _STEP_DTYPES)
    if sigma == 0.0:
        return
    _ops()
    PERTURB_LIST(
        list(params), [int(o) for o in offsets], int(seed), int(bucket_id),
        _host(step, step_t, int), step_t, int(tag), float(sigma))


def restore_and_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                      moms: Sequence[torch.Tensor] | None, offsets: Sequence[int],
                      grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None, seed: int,
                      bucket_id: int, step: int | torch.Tensor, restore_tag: int, sigma: float,
                      lr: float | torch.Tensor, weight_decay: float, momentum: float,
                      dampening: float, nesterov: bool, momentum_init: bool,
                      noise_std: float | torch.Tensor, grad_mult: float,
                      stochastic_rounding: bool = False) -> None:
    """The fused restore + decay + momentum + Langevin + update pass over a tensor list.
    ``step`` / ``lr`` / ``noise_std`` may be one-element device tensors, and
    ``stochastic_rounding`` rounds 16-bit params stochastically (module docstring). One call
    of the op ``fused_flat_cuda::restore_and_step_list_``."""
    mt.check_lists("restore_and_step_", "params", params, grads=grads, moms=moms)
    _check_offsets("restore_and_step_", params, offsets)
    if not params:
        return
    device = _device(params[0])
    step_t = device_scalar("cuda_multi.restore_and_step_", "step", step, device, _STEP_DTYPES)
    lr_t = device_scalar("cuda_multi.restore_and_step_", "lr", lr, device, _FLOAT_DTYPES)
    noise_std_t = device_scalar("cuda_multi.restore_and_step_", "noise_std", noise_std, device,
                                _FLOAT_DTYPES)
    sr = bool(stochastic_rounding) and params[0].dtype in (torch.bfloat16, torch.float16)
    _ops()
    RESTORE_AND_STEP_LIST(
        list(params), list(grads), list(moms) if moms is not None else [],
        [int(o) for o in offsets], grad_scale, found_inf, int(seed), int(bucket_id),
        _host(step, step_t, int), step_t, int(restore_tag), float(sigma),
        _host(lr, lr_t, float), lr_t, float(weight_decay), float(momentum), float(dampening),
        bool(nesterov), bool(momentum_init), _host(noise_std, noise_std_t, float), noise_std_t,
        float(grad_mult), sr)


def all_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """found_inf: float32 [1] on the device, 1.0 if any element is inf or NaN; one launch
    (one call of the op ``fused_flat_cuda::all_finite_list``)."""
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(1, dtype=torch.float32)
    if not (mt.lists_ok(tensors, (tensors,)) or all(
            t.dim() == 1 and t.is_contiguous() and t.dtype == tensors[0].dtype
            and t.device == tensors[0].device for t in tensors)):
        from fused_flat.backends import reference

        return reference.all_finite(tensors)
    _device(tensors[0])
    _ops()
    return ALL_FINITE_LIST(tensors)


if available():

    @torch.library.register_fake("fused_flat::perturb_multi_")
    def _perturb_fake(params, chunks, meta, ptrs, chunk, seed, bucket_id, step, tag, sigma,
                      step_t=None):
        return None

    @torch.library.register_fake("fused_flat::restore_and_step_multi_")
    def _step_fake(params, grads, moms, grad_scale, found_inf, chunks, meta, ptrs, chunk, seed,
                   bucket_id, step, restore_tag, sigma, lr, weight_decay, momentum, dampening,
                   nesterov, momentum_init, noise_std, grad_mult, stochastic_rounding=False,
                   step_t=None, lr_t=None, noise_std_t=None):
        return None

    @torch.library.register_fake("fused_flat::all_finite_multi")
    def _all_finite_fake(tensors, chunks, meta, ptrs, chunk, scratch):
        return torch.empty(1, dtype=torch.float32, device=tensors[0].device)
