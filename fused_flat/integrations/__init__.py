"""Training-framework integrations (imported on demand; ``import fused_flat`` imports none).

- :mod:`fused_flat.integrations.lightning`: ``FusedFlatCallback`` for Lightning
  (``lightning`` or ``pytorch_lightning``): one fSGLD/RWP perturbation per optimizer step
  also with ``accumulate_grad_batches > 1``, validation / checkpoints on unperturbed
  weights, a clear error for the SAM family with gradient accumulation.
- :mod:`fused_flat.integrations.transformers`: ``FusedFlatCallback`` (fSGLD/RWP under
  ``transformers.Trainer``, whose ``optimizer.step()`` takes no closure) and
  ``FusedFlatTrainer`` (SAM/ASAM/USAM: two forward/backward passes per step, exact with
  gradient accumulation).

This module itself imports neither framework; the helpers below are framework-free.
"""
from __future__ import annotations

__all__: list[str] = []


def unwrap_optimizer(optimizer):
    """The fused_flat optimizer inside framework wrappers (Lightning's LightningOptimizer
    keeps it in ``_optimizer``, accelerate's AcceleratedOptimizer in ``optimizer``);
    anything else is returned as it is."""
    from fused_flat.optim.core import FlatOptimizer

    seen = 0
    while optimizer is not None and not isinstance(optimizer, FlatOptimizer) and seen < 8:
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            inner = getattr(optimizer, "_optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer, seen = inner, seen + 1
    return optimizer


def is_langevin(optimizer) -> bool:
    from fused_flat.optim.langevin import LangevinOptimizer

    return isinstance(optimizer, LangevinOptimizer)


def is_sam(optimizer) -> bool:
    from fused_flat.optim.sam import SAM

    return isinstance(optimizer, SAM)


def perturbs(optimizer) -> bool:
    """Whether a Langevin-family optimizer takes its gradient at a perturbed point (fSGLD,
    RWP: sigma > 0 in some param group); False for SGLD."""
    return is_langevin(optimizer) and any(
        optimizer.group_sigma(g) != 0.0 for g in optimizer.param_groups)


def sam_variant_error(optimizer, framework: str, alternative: str) -> str | None:
    """The reason a SAM-family optimizer cannot run in ``framework``'s generic training step
    (MSAM and RWSAM have their own ``step`` contracts), or None."""
    from fused_flat.optim.msam import MSAM
    from fused_flat.optim.rwsam import RWSAM

    name = type(optimizer).__name__
    if isinstance(optimizer, MSAM):
        return (f"{name} under {framework}: MSAM.step(closure, batch) splits the batch into "
                f"micro-batches itself (closure(micro_batch) per part), which {framework}'s "
                f"training step cannot call. {alternative}")
    if isinstance(optimizer, RWSAM):
        return (f"{name} under {framework}: RWSAM.step(closure) needs a closure that returns the "
                f"per-sample losses without calling backward(), which {framework}'s training step "
                f"does not provide. {alternative}")
    return None


def restore_all(optimizers) -> None:
    """Undo any active perturbation (no update) of every Langevin-family optimizer."""
    for opt in optimizers:
        if is_langevin(opt):
            opt.restore()
