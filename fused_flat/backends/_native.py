"""Loading of the compiled extension ``fused_flat._C``.

A missing or broken extension never breaks ``import fused_flat``: the reason is kept
here, the optimizers fall back to the pure-torch reference backend, and one warning
says why and how to build the fast path.
"""
from __future__ import annotations

import warnings

import torch  # noqa: F401  (libc10 must be loaded before the extension)

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` (or `make build`) in the "
    "fused_flat checkout; see README.md"
)

_C = None
load_error: str | None = None
try:
    from fused_flat import _C  # type: ignore[attr-defined,no-redef]
except Exception as exc:  # ImportError, or an undefined symbol after a torch upgrade
    load_error = f"{type(exc).__name__}: {exc}"

_warned = False


def available() -> bool:
    """True when the compiled ops are registered under ``torch.ops.fused_flat``."""
    return _C is not None


def build_info() -> dict:
    """How the extension was built ({} when it is not loaded)."""
    return dict(_C.build_info()) if _C is not None else {}


def cuda_built() -> bool:
    return bool(build_info().get("with_cuda", False))


def warn_fallback(what: str) -> None:
    """Say once, clearly, that ``what`` runs on the reference path and why."""
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"fused_flat: the compiled extension is not available ({load_error}); {what} "
        f"uses the pure-torch reference backend, which is correct but slow. To get the "
        f"fused kernels, {BUILD_HINT}.",
        RuntimeWarning,
        stacklevel=3,
    )
