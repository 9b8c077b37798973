"""The one place that decides which backend runs a bucket.

A backend is an object with ``perturb_`` and ``restore_and_step_`` of the signatures
in fused_flat.ops / fused_flat.reference, and ``supports(tensor)``.

'auto' rule: CUDA tensors -> 'triton' when Triton is importable, else 'cuda' (the
compiled CUDA kernels), else 'reference'; CPU tensors -> 'cpp', else 'reference'.
An explicit backend that cannot run raises ValueError naming why and how to fix it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from fused_flat import _native

NAMES = ("auto", "reference", "cpp", "cuda", "triton")


@dataclass(frozen=True)
class Backend:
    name: str
    perturb_: Callable
    restore_and_step_: Callable
    devices: tuple  # device types it runs on

    def supports(self, t: torch.Tensor) -> bool:
        return t.device.type in self.devices


def _reference() -> Backend:
    from fused_flat import reference

    return Backend("reference", reference.perturb_, reference.restore_and_step_, ("cpu", "cuda", "meta"))


def _compiled(name: str, device: str) -> Backend:
    if not _native.available():
        raise RuntimeError(f"the compiled extension is not available ({_native.load_error}); "
                           f"{_native.BUILD_HINT}")
    if device == "cuda" and not _native.cuda_built():
        raise RuntimeError("the extension was built without CUDA kernels; rebuild with nvcc on "
                           "PATH (or CUDA_HOME set) and FORCE_CUDA=1")
    from fused_flat import ops

    return Backend(name, ops.perturb_, ops.restore_and_step_, (device,))


def _triton() -> Backend:
    try:
        mod = importlib.import_module("fused_flat.triton")
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


def resolve(name: str, t: torch.Tensor) -> Backend:
    """The backend that runs bucket ``t`` when the user asked for ``name``."""
    check_name(name)
    if name != "auto":
        try:
            b = get(name)
        except RuntimeError as exc:
            raise ValueError(f"{exc}. Use backend='auto' to fall back automatically.") from None
        if not b.supports(t):
            raise ValueError(f"fused_flat: backend '{name}' runs on {b.devices} tensors, but a "
                             f"parameter bucket is on {t.device}; use backend='auto'.")
        return b
    order = ("triton", "cuda") if t.device.type == "cuda" else ("cpp",)
    for cand in order:
        try:
            b = get(cand)
        except RuntimeError:
            continue
        if b.supports(t):
            return b
    if t.device.type in ("cpu", "cuda"):
        _native.warn_fallback(f"the {t.device.type} {t.dtype} bucket")
    return get("reference")
