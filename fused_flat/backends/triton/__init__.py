"""The Triton backend of fused_flat: ``backend()`` returns its list passes as a Backend.

Every pass is a multi-tensor kernel, one launch per bucket per pass: the Langevin passes
(perturb, perturb from fp32 masters, restore + update) and the finiteness check in
``multi.py``, the SAM-family passes in ``sam.py``; both built on the noise helpers of
``noise.py`` (which reproduce csrc/include/fused_flat/elementwise.h) and the block helpers
of ``common.py``. Each pass is one registered torch op (namespace ``fused_flat_triton``).

The kernels compute in fp32 and take fp32 / bf16 / fp16 buckets (``common.DTYPES``, the
Backend's ``dtypes``): fused_flat.backends.resolve gives an fp64 bucket to another backend,
and a direct call with an fp64 list raises ValueError; nothing is handed on internally.

Devices: CUDA; also CPU when ``TRITON_INTERPRET=1`` (so the test-suite can run the
optimizers with backend='triton' without a GPU).
"""
from __future__ import annotations

import os

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the install
    raise ImportError(f"fused_flat.backends.triton needs Triton ({type(exc).__name__}: {exc}); it "
                      f"ships with CUDA builds of torch, or `pip install triton`") from exc

from fused_flat.backends.base import SAM_OPS, Backend

__all__ = ["backend", "interpreted"]


def interpreted() -> bool:
    """Whether the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def backend() -> Backend:
    """The 'triton' Backend: CUDA tensors (and CPU tensors under TRITON_INTERPRET=1) of the
    dtypes of ``common.DTYPES``. Its list kernels round 16-bit results stochastically on
    request and read step / lr / noise_std from device tensors (capturable=True)."""
    from fused_flat.backends.triton import common, multi, sam

    return Backend("triton", multi.perturb_, multi.restore_and_step_,
                   ("cuda", "cpu") if interpreted() else ("cuda",),
                   all_finite=multi.all_finite, perturb_from_=multi.perturb_from_,
                   stochastic_rounding=True, device_scalars=True, dtypes=common.DTYPES,
                   **{name: getattr(sam, name) for name in SAM_OPS})
