"""fused_flat: fused optimizer kernels for flatness-seeking training.

One-gradient optimizers: SGLD, FSGLD, RWP (fused_flat.langevin). Two-gradient baselines:
SAM (ASAM with adaptive=True, USAM with normalize=False), MSAM, RWSAM (fused_flat.sam).
BatchNorm helpers: disable_running_stats, enable_running_stats, running_stats_frozen.
Backends: 'reference' (pure torch), 'cpp' (C++ CPU kernels), 'cuda', 'triton';
'auto' picks the fastest one available (fused_flat.backends). ``python -m fused_flat info``
says which are available here and why not.
"""
from fused_flat import _native
from fused_flat.backends import available_backends
from fused_flat.bn import disable_running_stats, enable_running_stats, running_stats_frozen
from fused_flat.langevin import FSGLD, RWP, SGLD, LangevinOptimizer
from fused_flat.sam import MSAM, RWSAM, SAM, choose_delta

from fused_flat._version import __version__
__all__ = ["SGLD", "FSGLD", "RWP", "LangevinOptimizer", "SAM", "MSAM", "RWSAM", "choose_delta",
           "disable_running_stats", "enable_running_stats", "running_stats_frozen",
           "available_backends", "__version__"]
