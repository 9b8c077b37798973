"""fused_flat: fused optimizer kernels for flatness-seeking training.

One-gradient optimizers: SGLD, FSGLD, RWP (fused_flat.optim.langevin). Two-gradient baselines:
SAM (ASAM with adaptive=True, USAM with normalize=False; fused_flat.optim.sam), MSAM
(fused_flat.optim.msam), RWSAM (fused_flat.optim.rwsam).
BatchNorm helpers: disable_running_stats, enable_running_stats, running_stats_frozen.
Backends: 'reference' (pure torch), 'cpp' (C++ CPU kernels), 'cuda', 'triton';
'auto' picks the fastest one available (fused_flat.backends). ``python -m fused_flat info``
says which are available here and why not.
"""
from fused_flat.backends import available_backends
from fused_flat.nn.bn import disable_running_stats, enable_running_stats, running_stats_frozen
from fused_flat.optim import FSGLD, MSAM, RWP, RWSAM, SAM, SGLD, LangevinOptimizer, choose_delta

from fused_flat._version import __version__
__all__ = ["SGLD", "FSGLD", "RWP", "LangevinOptimizer", "SAM", "MSAM", "RWSAM", "choose_delta",
           "disable_running_stats", "enable_running_stats", "running_stats_frozen",
           "available_backends", "__version__"]
