"""Typed Python entry points of the compiled ops (``torch.ops.fused_flat.*``).

The schemas are declared once, in csrc/bindings.cpp. Fake (meta) implementations are
registered here so the ops trace under ``torch.compile``. Importing this module never
fails: without the extension, calling an op raises with the reason and the fix.
"""
from __future__ import annotations

import torch

from fused_flat.backends import _native


# The ops the compiled backends' passes call, with the dispatch keys that have kernels for
# them: the list ops (one op set for both devices, schemas csrc/bindings.cpp and
# csrc/sam_ops.cpp) and perturb_from_ (master weights) on CPU and CUDA; CPU_OPS on CPU only,
# by design: the step-plan ops (plan_layout, check_step_list, and restore_check_list_, the
# checked fp32 step of a plan) work on the user's own CPU tensors, and a CUDA step has no
# plans (its found_inf stays on the device: all_finite). Every one has a fake implementation
# (below, cpp_sam.py). tests/test_op_registry.py checks both.
LIST_OPS = ("perturb_list_", "restore_and_step_list_", "all_finite", "sam_grad_sq_norm_list",
            "sam_perturb_list_", "sam_restore_and_step_list_", "sam_probe_list_", "perturb_from_")
CPU_OPS = ("restore_check_list_", "plan_layout", "check_step_list")


def scalar_arg(value, cast):
    """(number, tensor) for a per-step value handed to a list op: a Python number goes as the
    number (tensor None); a one-element tensor as the tensor argument (``step_t``, ``lr_t``,
    ...), the number then 0. The op reads the tensor (CPU: when it runs; CUDA: in the kernel)."""
    if isinstance(value, torch.Tensor):
        return cast(0), value
    return cast(value), None


def _ops():
    if not _native.available():
        raise RuntimeError(
            f"fused_flat: the compiled extension is not available ({_native.load_error}); "
            f"{_native.BUILD_HINT}, or use backend='reference'."
        )
    return torch.ops.fused_flat


def has_list_ops() -> bool:
    """Whether the extension has the CPU list forms (perturb_list_, restore_and_step_list_):
    built from these sources (an older build lacks them: rebuild)."""
    return _native.available() and hasattr(torch.ops.fused_flat, "restore_check_list_")


def has_plan_ops() -> bool:
    """Whether the extension has the step-plan ops (plan_layout, check_step_list, and the list
    ops' ``layout`` argument): built from these sources."""
    return _native.available() and hasattr(torch.ops.fused_flat, "check_step_list")


def perturb_list_(params: list[torch.Tensor], offsets: list[int], seed: int, bucket_id: int,
                  step: int | torch.Tensor, tag: int, sigma: float,
                  layout: torch.Tensor | None = None) -> None:
    """theta <- theta + sigma * eps(tag) over a list of tensors of one dtype (tensor t's
    element e at bucket index offsets[t] + e) in one parallel loop (CPU) or one launch
    (CUDA; fused_flat.backends.cuda checks its lists first). Without ``layout`` the tensors are
    1-D contiguous; with it (:func:`plan_layout` of ``params``) any dense shape, in memory
    order (CPU). ``step`` may be a one-element int64 tensor on the lists' device (read when
    the op runs; the same bits as the number)."""
    step, step_t = scalar_arg(step, int)
    _ops().perturb_list_(params, offsets, seed, bucket_id, step, tag, sigma, layout, step_t)


def restore_and_step_list_(params: list[torch.Tensor], grads: list[torch.Tensor],
                           moms: list[torch.Tensor] | None, offsets: list[int],
                           grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None,
                           seed: int, bucket_id: int, step: int | torch.Tensor, restore_tag: int,
                           sigma: float, lr: float | torch.Tensor, weight_decay: float,
                           momentum: float, dampening: float, nesterov: bool,
                           momentum_init: bool, noise_std: float | torch.Tensor,
                           grad_mult: float, stochastic_rounding: bool = False,
                           layout: torch.Tensor | None = None) -> None:
    """The fused restore + decay + momentum + Langevin + update pass (ALGORITHMS.md §2; the
    math: fused_flat.backends.reference.restore_and_step_ per tensor at its offset) over a
    list of tensors in one parallel loop (``moms`` None: no momentum); ``stochastic_rounding``:
    bf16/fp16 params get the stochastically rounded result (ALGORITHMS.md §1), ignored for
    fp32/fp64. ``layout``: as in :func:`perturb_list_` (the
    gradients are then checked against their parameters, read in the parameter's order).
    ``step`` / ``lr`` / ``noise_std`` may be one-element tensors on the lists' device (int64;
    float64 or float32), read when the op runs: under torch.compile graph inputs, not guards
    (one compilation for every step and learning rate)."""
    step, step_t = scalar_arg(step, int)
    lr, lr_t = scalar_arg(lr, float)
    noise_std, noise_std_t = scalar_arg(noise_std, float)
    _ops().restore_and_step_list_(params, grads, moms or [], offsets, grad_scale, found_inf, seed,
                                  bucket_id, step, restore_tag, sigma, lr, weight_decay, momentum,
                                  dampening, nesterov, momentum_init, noise_std, grad_mult,
                                  stochastic_rounding, layout, step_t, lr_t, noise_std_t)


def restore_check_list_(params: list[torch.Tensor], grads: list[torch.Tensor], offsets: list[int],
                        seed: int, bucket_id: int, step: int, tag: int,
                        sigma: float, layout: torch.Tensor | None = None) -> torch.Tensor:
    """The restore half of a checked fp32 step: params[t] += sigma * eps(tag) (sigma: minus the
    perturbation's) and, in the same pass, float32 [1] found_inf = 1.0 if any gradient element
    is inf/NaN. Followed by restore_and_step_list_ with sigma 0 when found_inf is 0, it gives
    the bits of the fused restore_and_step_list_ (tests/test_cpu_list_ops.py). ``layout``: as
    in :func:`perturb_list_`."""
    args = (params, grads, list(offsets), seed, bucket_id, step, tag, sigma)
    return _ops().restore_check_list_(*args, *(() if layout is None else (layout,)))


def plan_layout(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The record (int64) of a list of dense CPU tensors of one floating dtype -- each one's
    requires_grad, shape and strides -- that the list ops take as ``layout`` (a step plan,
    fused_flat.optim.core.StepPlan). The ops refuse a list that no longer matches it."""
    return _ops().plan_layout(tensors)


def check_step_list(params: list[torch.Tensor], layout: torch.Tensor,
                    grads: list[torch.Tensor | None], has_grad: torch.Tensor | None,
                    finite: bool) -> torch.Tensor:
    """The first pass of a planned step over a bucket; writes nothing. ``params`` (all of the
    bucket's) against their record; with ``grads`` (one per parameter, None where there is
    none) each gradient against its parameter (strided, same shape, dtype and device:
    ValueError) and present exactly where ``has_grad`` (bool [T]) says. Returns found_inf,
    float32 [1]: 1.0 if ``finite`` and any gradient element is inf or NaN."""
    return _ops().check_step_list(params, layout, grads, has_grad, finite)


def perturb_from_(param: torch.Tensor, master: torch.Tensor, seed: int, bucket_id: int, step: int,
                  tag: int, sigma: float, offset: int = 0) -> None:
    """param <- round-to-nearest(master + sigma * eps(tag)), fp32 math (see reference.py)."""
    _ops().perturb_from_(param, master, seed, bucket_id, step, tag, sigma, offset)


def philox_words(seed: int, bucket_id: int, step: int, tag: int, first_call: int,
                 n_calls: int) -> torch.Tensor:
    """Philox words of calls [first_call, first_call + n_calls), int64 [n_calls, 4] (CPU).
    Noise layout 3: call j serves bucket elements 4j .. 4j+3."""
    return _ops().philox_words(seed, bucket_id, step, tag, first_call, n_calls)


def normal_noise(seed: int, bucket_id: int, step: int, tag: int, offset: int, n: int) -> torch.Tensor:
    """z(tag, i) of bucket elements [offset, offset + n), float32 (CPU)."""
    return _ops().normal_noise(seed, bucket_id, step, tag, offset, n)


def element_words(seed: int, bucket_id: int, step: int, tag: int, offset: int, n: int) -> torch.Tensor:
    """w(tag, i) = x_(i & 3), the element's own Philox word, of elements [offset, offset + n),
    int64 in [0, 2^32) (CPU)."""
    return _ops().element_words(seed, bucket_id, step, tag, offset, n)


def gaussian_noise(seed: int, bucket_id: int, step: int, tag: int, offset: int,
                   n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, xi) = (z(tag, i), z(32, i)) of bucket elements [offset, offset + n), float32 (CPU):
    the noise a pass with restore tag ``tag`` uses."""
    return _ops().gaussian_noise(seed, bucket_id, step, tag, offset, n)


def noise_roofline(seed: int, bucket_id: int, step: int, tags: list[int], n: int) -> torch.Tensor:
    """Generates z(tag, .) of n elements for each tag with the CPU's fastest generator into
    L1 buffers (no parameter traffic) and returns a checksum: the noise limit of a pass."""
    return _ops().noise_roofline(seed, bucket_id, step, list(tags), n)


def cpu_isa() -> str:
    """The ISA the CPU loops use now: 'baseline', 'avx2' or 'avx512'. The environment
    variable FUSED_FLAT_CPU_ISA (baseline | avx2 | avx512 | auto) forces one, read at every
    call; forcing one the CPU lacks raises."""
    return _ops().cpu_isa()


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """found_inf of ``tensors``: float32 [1] on their device, 1.0 if any element is inf/nan.
    One read of each tensor at memory bandwidth; no host synchronisation on CUDA."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32)
    return _ops().all_finite(tensors)


if _native.available():
    if hasattr(torch.ops.fused_flat, "restore_check_list_"):
        @torch.library.register_fake("fused_flat::perturb_list_")
        def _perturb_list_fake(params, offsets, seed, bucket_id, step, tag, sigma, layout=None,
                               step_t=None):
            return None

        @torch.library.register_fake("fused_flat::restore_check_list_")
        def _restore_check_list_fake(params, grads, offsets, seed, bucket_id, step, tag, sigma,
                                     layout=None):
            return torch.empty(1, dtype=torch.float32)

        @torch.library.register_fake("fused_flat::restore_and_step_list_")
        def _restore_and_step_list_fake(params, grads, moms, offsets, grad_scale, found_inf, seed,
                                        bucket_id, step, restore_tag, sigma, lr, weight_decay,
                                        momentum, dampening, nesterov, momentum_init, noise_std,
                                        grad_mult, stochastic_rounding=False, layout=None,
                                        step_t=None, lr_t=None, noise_std_t=None):
            return None

    if hasattr(torch.ops.fused_flat, "check_step_list"):
        @torch.library.register_fake("fused_flat::plan_layout")
        def _plan_layout_fake(tensors):
            return torch.empty(3 + sum(2 + 2 * t.dim() for t in tensors), dtype=torch.int64)

        @torch.library.register_fake("fused_flat::check_step_list")
        def _check_step_list_fake(params, layout, grads, has_grad, finite):
            return torch.empty(1, dtype=torch.float32)

    @torch.library.register_fake("fused_flat::perturb_from_")
    def _perturb_from_fake(param, master, seed, bucket_id, step, tag, sigma, offset=0):
        return None

    @torch.library.register_fake("fused_flat::philox_words")
    def _philox_words_fake(seed, bucket_id, step, tag, first_call, n_calls):
        return torch.empty((n_calls, 4), dtype=torch.int64)

    @torch.library.register_fake("fused_flat::normal_noise")
    def _normal_noise_fake(seed, bucket_id, step, tag, offset, n):
        return torch.empty(n, dtype=torch.float32)

    @torch.library.register_fake("fused_flat::element_words")
    def _element_words_fake(seed, bucket_id, step, tag, offset, n):
        return torch.empty(n, dtype=torch.int64)

    @torch.library.register_fake("fused_flat::noise_roofline")
    def _noise_roofline_fake(seed, bucket_id, step, tags, n):
        return torch.empty((), dtype=torch.float32)

    @torch.library.register_fake("fused_flat::all_finite")
    def _all_finite_fake(tensors):
        return torch.empty(1, dtype=torch.float32, device=tensors[0].device)

    @torch.library.register_fake("fused_flat::gaussian_noise")
    def _gaussian_noise_fake(seed, bucket_id, step, tag, offset, n):
        return torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.float32)
