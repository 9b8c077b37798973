"""The optimizers users import, on one core (fused_flat.optim.core: buckets, state, checkpoints,
seeds, step plans; fused_flat.optim.buckets: the flat index space over the user's tensors).

Langevin family, one gradient a step (fused_flat.optim.langevin): SGLD, FSGLD, RWP.
SAM family, two gradients a step: SAM / ASAM / USAM (fused_flat.optim.sam), MSAM
(fused_flat.optim.msam), RWSAM (fused_flat.optim.rwsam). Floors: this package imports
fused_flat.backends and fused_flat.noise, never the other way round.
"""
from fused_flat.optim.langevin import FSGLD, RWP, SGLD, LangevinOptimizer
from fused_flat.optim.msam import MSAM
from fused_flat.optim.rwsam import RWSAM, choose_delta
from fused_flat.optim.sam import SAM

__all__ = ["SGLD", "FSGLD", "RWP", "LangevinOptimizer", "SAM", "MSAM", "RWSAM", "choose_delta"]
