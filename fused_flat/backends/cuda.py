"""The Langevin list ops on CUDA, with the Backend list signatures: thin wrappers of the
compiled ops ``torch.ops.fused_flat.perturb_list_``, ``restore_and_step_list_`` and
``all_finite`` -- the ops the CPU backend calls too, one op set with a CPU and a CUDA kernel
each (schemas csrc/bindings.cpp; CUDA kernels csrc/cuda/multi_langevin.cu).

    perturb_(params, offsets, seed, bucket_id, step, tag, sigma)
    restore_and_step_(params, grads, moms|None, offsets, grad_scale, found_inf, seed,
                      bucket_id, step, restore_tag, sigma, lr, weight_decay, momentum,
                      dampening, nesterov, momentum_init, noise_std, grad_mult,
                      stochastic_rounding=False)
    all_finite(tensors) -> float32 [1] on the device (1.0 if any inf/NaN)

Lists hold 1-D contiguous CUDA tensors of one dtype (fp32/bf16/fp16/fp64); the math and the
noise are the CPU ops' (csrc/include/fused_flat/elementwise.h; oracle
fused_flat.backends.reference per tensor at its offset). One pass is one launch per bucket
(more when the list exceeds one launch's capacity): the compiled op builds the launch
arguments itself and passes them BY VALUE in the kernel's argument block
(csrc/cuda/list_launch.h) -- no launch tables, no host->device copy, no cache -- so a call
never synchronises with the host and is capturable in a CUDA graph on its first call.
``grad_scale`` / ``found_inf`` are read by the kernels.

These wrappers only check metadata and call the op once. Under FakeTensorMode or
torch.compile's tracing the op runs its fake implementation (fused_flat.backends.cpp), so a
step on fake CUDA tensors makes no host read and a compiled step holds one node per pass;
the by-value argument building lives in the op's CUDA implementation, which fake tensors
replace: tests/test_gpu_sync.py checks it on a GPU (``make gpu-check``).

``stochastic_rounding=True`` (bf16/fp16 params; ignored for fp32/fp64): the same one launch,
theta stored stochastically rounded with the rbits of ALGORITHMS.md §1 (tags 0 and 32 of
(seed, bucket_id, step) at bucket index offsets[t] + e), the CPU kernels' per-element math:
bit-identical results.

Device-resident per-step scalars (CUDA-graph capture, ``capturable=True``): ``step`` may be a
Python int or a one-element int64 tensor on the params' device; ``lr`` and ``noise_std`` (of
``restore_and_step_``) a Python float or a one-element float64 (or float32) tensor there.
A tensor goes to the op's ``step_t`` / ``lr_t`` / ``noise_std_t`` argument and is read by the
kernel from device memory when it runs (a captured graph replays with the tensor's current
value); nothing is read on the host. The kernel converts it as the scalar path converts the
Python number (``float(t)`` / ``int(t)``; the step's low 32 bits enter the Philox counter):
bit-identical results. A tensor ``noise_std`` always draws xi: pass the float 0.0 for a pass
without Langevin noise. (A result that is exactly zero may then differ in the sign of the
zero from the scalar path's, -0.0 + 0 * xi.)
"""
from __future__ import annotations

from typing import Sequence

import torch

from fused_flat.backends import _native
from fused_flat.backends import cpp as _cpp  # noqa: F401  (the list ops' fake implementations)
from fused_flat.backends import cuda_arch
from fused_flat.backends import multi_tensor as mt   # check_lists: metadata checks only


def available() -> bool:
    """Whether the extension has the list ops' CUDA kernels (this module and cuda_sam)."""
    return _native.available() and _native.cuda_built() and hasattr(torch.ops.fused_flat,
                                                                     "sam_probe_list_")


def _ops():
    if not _native.available():
        raise RuntimeError(f"fused_flat: the compiled extension is not available "
                           f"({_native.load_error}); {_native.BUILD_HINT}")
    if not available():
        raise RuntimeError("fused_flat: the extension was built without the CUDA list ops "
                           f"(no nvcc, or FORCE_CUDA=0); {_native.BUILD_HINT} with CUDA_HOME set")
    return torch.ops.fused_flat


def _device(ref: torch.Tensor, module: str = "cuda", others: str = "triton.multi, cpp or "
            "reference") -> torch.device:
    """``ref``'s device, which must be a CUDA device (ValueError naming the alternatives)."""
    device = ref.device
    if device.type != "cuda":
        raise ValueError(f"fused_flat.backends.{module}: CUDA tensors only, got {device}; use "
                         f"fused_flat.backends.{others}")
    return device


def check_device(ref: torch.Tensor) -> None:
    """A clear error when the build has no kernels for this GPU (cuda_arch.check_device; a
    host query, no sync). Skipped for fake tensors and while torch.compile traces."""
    if torch.compiler.is_compiling() or torch._subclasses.fake_tensor.is_fake(ref):
        return
    cuda_arch.check_device(ref.device)


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


# ------------------------------------------------------------------ entry points
def perturb_(params: Sequence[torch.Tensor], offsets: Sequence[int], seed: int, bucket_id: int,
             step: int | torch.Tensor, tag: int, sigma: float) -> None:
    """theta <- theta + sigma * eps(tag), eps at bucket indices offsets[t] + e. ``step``: a
    Python int or a one-element int64 device tensor (module docstring). One call of the op
    ``fused_flat::perturb_list_``."""
    mt.check_lists("perturb_", "params", params)
    _check_offsets("perturb_", params, offsets)
    if not params:
        return
    device = _device(params[0])
    step_t = device_scalar("fused_flat.backends.cuda.perturb_", "step", step, device, _STEP_DTYPES)
    if sigma == 0.0:
        return
    check_device(params[0])
    _ops().perturb_list_(list(params), [int(o) for o in offsets], int(seed), int(bucket_id),
                         _host(step, step_t, int), int(tag), float(sigma), None, step_t)


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
    of the op ``fused_flat::restore_and_step_list_``."""
    mt.check_lists("restore_and_step_", "params", params, grads=grads, moms=moms)
    _check_offsets("restore_and_step_", params, offsets)
    if not params:
        return
    device = _device(params[0])
    step_t = device_scalar("fused_flat.backends.cuda.restore_and_step_", "step", step, device, _STEP_DTYPES)
    lr_t = device_scalar("fused_flat.backends.cuda.restore_and_step_", "lr", lr, device, _FLOAT_DTYPES)
    noise_std_t = device_scalar("fused_flat.backends.cuda.restore_and_step_", "noise_std", noise_std, device,
                                _FLOAT_DTYPES)
    sr = bool(stochastic_rounding) and params[0].dtype in (torch.bfloat16, torch.float16)
    check_device(params[0])
    _ops().restore_and_step_list_(
        list(params), list(grads), list(moms) if moms is not None else [],
        [int(o) for o in offsets], grad_scale, found_inf, int(seed), int(bucket_id),
        _host(step, step_t, int), int(restore_tag), float(sigma), _host(lr, lr_t, float),
        float(weight_decay), float(momentum), float(dampening), bool(nesterov),
        bool(momentum_init), _host(noise_std, noise_std_t, float), float(grad_mult), sr, None,
        step_t, lr_t, noise_std_t)


def all_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """found_inf: float32 [1] on the device, 1.0 if any element is inf or NaN (any strided
    floating tensors; one launch per dtype present). One call of the op
    ``fused_flat::all_finite``."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32)
    _device(tensors[0])
    check_device(tensors[0])
    return _ops().all_finite(tensors)
