"""The one place that decides which backend runs a bucket, for both optimizer families.

A backend runs the passes of a bucket over *lists* of 1-D tensors (the :func:`flat` views
of the user's parameters, gradients and momentum buffers, fused_flat.optim.buckets) with each
tensor's offset in the bucket's index space:

* ``perturb_(params, offsets, seed, bucket_id, step, tag, sigma)``
* ``restore_and_step_(params, grads, moms, offsets, grad_scale, found_inf, seed, bucket_id,
  step, restore_tag, sigma, lr, weight_decay, momentum, dampening, nesterov, momentum_init,
  noise_std, grad_mult)``
* ``perturb_from_(params, masters, offsets, seed, bucket_id, step, tag, sigma)``: 16-bit
  params <- round(fp32 master + sigma * eps) (``master_weights=True``)
* ``restore_and_step_`` and ``sam_restore_and_step_`` take ``stochastic_rounding`` (and SAM the
  seed, bucket, step and offsets of its rounding bits) for 16-bit parameters
* ``all_finite(tensors) -> float32 [1]`` (1.0 when any element is inf or NaN; one read)
* ``sam_grad_sq_norm(grads, params, eta) -> 0-dim float64``, ``sam_perturb_(params, grads,
  backups, adaptive, coef, eta)``, ``sam_restore_and_step_(params, backups, grads, moms,
  grad_scale, found_inf, lr, weight_decay, momentum, dampening, nesterov, momentum_init,
  grad_mult)``, ``sam_probe_(params, backups, offsets, seed, bucket_id, step, delta)``

(the per-element math: fused_flat.backends.reference and fused_flat.backends.sam_reference).
What a backend is (the Backend record, list lifting) lives in fused_flat.backends.base and
is re-exported here. The reference's per-tensor ops are lifted to lists; 'cpp' calls the
compiled list ops (torch.ops.fused_flat, one call per bucket and pass); the GPU backends
launch once per list ('triton': fused_flat.backends.triton.multi / .sam, 'cuda':
fused_flat.backends.cuda / cuda_sam, thin wrappers of the same compiled list ops).
Their ``restore_and_step_`` also takes ``stochastic_rounding=False``.

:func:`resolve` is the only place that decides which backend runs a bucket; no backend
hands a bucket (a dtype, a device) on to another one. 'auto' rule: the first backend that
is available and runs the bucket -- its device and dtype (``Backend.supports``: 'triton'
has fp32 / bf16 / fp16 kernels, the others every floating dtype) and, for the SAM family,
the SAM ops -- of: CUDA tensors -> 'triton', 'cuda' (the compiled CUDA kernels), else
'reference'; CPU tensors -> 'cpp', else 'reference'. So a CUDA fp64 bucket runs on 'cuda'
where it is built, else on the reference (with a warning). An explicit backend that cannot
run the bucket (not available, another device, a dtype it has no kernels for, no SAM ops)
raises ValueError naming why and what to use instead.
"""
from __future__ import annotations

import dataclasses
import importlib
import warnings

import torch

from fused_flat.backends import _native
from fused_flat.backends.base import (LANGEVIN_OPS, SAM_OPS, Backend, _host,  # noqa: F401
                                      from_list_ops, lift, with_langevin_lists,
                                      with_sam_lists)

NAMES = ("auto", "reference", "cpp", "cuda", "triton")


# --------------------------------------------------------------------------- factories
def _reference() -> Backend:
    from fused_flat.backends import reference
    from fused_flat.backends import sam_reference

    return lift("reference", ("cpu", "cuda", "meta"), reference.perturb_,
                reference.restore_and_step_, sam_reference, perturb_from_=reference.perturb_from_)


def _compiled(name: str, device: str) -> Backend:
    if not _native.available():
        raise RuntimeError(f"the compiled extension is not available ({_native.load_error}); "
                           f"{_native.BUILD_HINT}")
    if device == "cuda" and not _native.cuda_built():
        raise RuntimeError("the extension was built without CUDA kernels; rebuild with nvcc on "
                           "PATH (or CUDA_HOME set) and FORCE_CUDA=1")
    from fused_flat.backends import cpp as ops
    from fused_flat.backends import cpp_sam

    if not (ops.has_list_ops() and ops.has_plan_ops() and cpp_sam.has_list_ops()):
        raise RuntimeError(f"the compiled extension predates the list ops (built from older "
                           f"sources); rebuild: {_native.BUILD_HINT}")
    # the list ops, one call per bucket and pass (CPU and CUDA kernels; on CUDA the thin
    # wrappers of fused_flat.backends.cuda / cuda_sam replace them below)
    b = from_list_ops(name, (device,), ops, cpp_sam if device == "cpu" else None,
                      cpu_tensor_scalars=device == "cpu")
    if device == "cpu":   # the step-plan ops: CPU only
        b = dataclasses.replace(b, restore_check_=ops.restore_check_list_,
                                plan_layout=ops.plan_layout, check_step=ops.check_step_list)
    if device == "cuda":
        from fused_flat.backends import cuda_sam

        if cuda_sam.available():
            b = with_sam_lists(b, cuda_sam)
        from fused_flat.backends import cuda as cuda_multi

        if cuda_multi.available():
            b = with_langevin_lists(b, cuda_multi)   # one launch per bucket per pass
        # both list-op sets read step / lr / noise_std from device tensors (capturable=True)
        b = dataclasses.replace(b, device_scalars=cuda_sam.available() and cuda_multi.available())
    return b


def _triton() -> Backend:
    try:
        mod = importlib.import_module("fused_flat.backends.triton")
    except Exception as exc:
        raise RuntimeError(f"the Triton kernels are not available ({type(exc).__name__}: {exc}); "
                           f"`pip install triton` (it ships with CUDA builds of torch)") from exc
    return mod.backend()


_FACTORIES = {
    "reference": _reference,
    "cpp": lambda: _compiled("cpp", "cpu"),
    "cuda": lambda: _compiled("cuda", "cuda"),
    "triton": _triton,
}
_cache: dict[str, Backend | str] = {}
_warned: set[str] = set()


def warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def get(name: str) -> Backend:
    """The backend called ``name``; RuntimeError with the reason when it cannot load."""
    if name not in _cache:
        try:
            _cache[name] = _FACTORIES[name]()
        except Exception as exc:
            _cache[name] = str(exc)
    got = _cache[name]
    if isinstance(got, str):
        raise RuntimeError(f"fused_flat: backend '{name}' is not available: {got}")
    return got


def available_backends() -> dict[str, str]:
    """{name: 'ok' or the reason it is missing} for every concrete backend."""
    out = {}
    for name in _FACTORIES:
        try:
            get(name)
            out[name] = "ok"
        except RuntimeError as exc:
            out[name] = str(exc)
    return out


def check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"backend must be one of {NAMES}, got {name!r}")


def _runs(b: Backend, t: torch.Tensor, sam: bool) -> bool:
    return b.supports(t) and (b.has_sam or not sam)


def _auto(t: torch.Tensor, sam: bool) -> Backend | None:
    """The first available backend of the 'auto' order that runs the bucket; None: none
    (the reference runs it)."""
    for cand in ("triton", "cuda") if t.device.type == "cuda" else ("cpp",):
        try:
            b = get(cand)
        except RuntimeError:
            continue
        if _runs(b, t, sam):
            return b
    return None


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def resolve(name: str, t: torch.Tensor, sam: bool = False) -> Backend:
    """The backend that runs a bucket of tensors like ``t`` (its device and dtype) when the
    user asked for ``name``; ``sam=True`` for the SAM family (the backend must have the SAM
    ops). 'auto': the module docstring's rule; an explicit name that cannot run the bucket:
    ValueError saying why and what to use."""
    check_name(name)
    family = "SAM" if sam else "Langevin"
    if name != "auto":
        try:
            b = get(name)
        except RuntimeError as exc:
            raise ValueError(f"{exc}. Use backend='auto' to fall back automatically.") from None
        if t.device.type not in b.devices:
            raise ValueError(f"fused_flat: backend '{name}' runs on {b.devices} tensors, but a "
                             f"parameter bucket is on {t.device}; use backend='auto'.")
        if t.dtype not in b.dtypes:
            alt = _auto(t, sam)
            alt = "reference" if alt is None else alt.name
            raise ValueError(f"fused_flat: backend '{name}' has no {t.dtype} kernels (it takes "
                             f"{_dtype_names(b.dtypes)}), but a parameter bucket is {t.dtype} on "
                             f"{t.device}; use backend='auto' (here it picks '{alt}' for that "
                             f"bucket) or backend='{alt}'.")
        if sam and not b.has_sam:
            raise ValueError(f"fused_flat: backend '{name}' has no {family} kernels yet; use "
                             f"backend='auto' or backend='reference'")
        return b
    b = _auto(t, sam)
    if b is not None:
        return b
    if t.device.type in ("cpu", "cuda"):
        if _native.available():
            warn_once(f"{family}-{t.device.type}-{t.dtype}",
                      f"fused_flat: no compiled {family} kernels for {t.device.type} {t.dtype} "
                      f"buckets here (the extension was built without them); the pure-torch "
                      f"reference backend runs them, correct but slow. Rebuild: "
                      f"{_native.BUILD_HINT}.")
        else:
            _native.warn_fallback(f"the {t.device.type} {t.dtype} bucket")
    return get("reference")


def per_tensor(b: Backend):
    """``b``'s Langevin passes with the per-tensor signatures of fused_flat.backends.reference
    (``perturb_(param, seed, bucket_id, step, tag, sigma, offset)``, ``restore_and_step_``,
    ``perturb_from_``): each call is the list pass over a one-tensor list, for tests and
    benchmarks that drive one tensor."""
    import types

    def perturb_(param, seed, bucket_id, step, tag, sigma, offset=0):
        b.perturb_([param], [offset], seed, bucket_id, step, tag, sigma)

    def restore_and_step_(param, grad, momentum_buffer, grad_scale, found_inf, seed, bucket_id,
                          step, offset, restore_tag, sigma, lr, weight_decay, momentum, dampening,
                          nesterov, momentum_init, noise_std, grad_mult, stochastic_rounding=False):
        b.restore_and_step_([param], [grad], None if momentum_buffer is None else [momentum_buffer],
                            [offset], grad_scale, found_inf, seed, bucket_id, step, restore_tag,
                            sigma, lr, weight_decay, momentum, dampening, nesterov, momentum_init,
                            noise_std, grad_mult, stochastic_rounding=stochastic_rounding)

    def perturb_from_(param, master, seed, bucket_id, step, tag, sigma, offset=0):
        b.perturb_from_([param], [master], [offset], seed, bucket_id, step, tag, sigma)

    return types.SimpleNamespace(name=b.name, perturb_=perturb_, restore_and_step_=restore_and_step_,
                                 perturb_from_=perturb_from_)
