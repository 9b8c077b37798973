"""fused_flat: fused optimizer kernels for flatness-seeking training.

Optimizers: SGLD, FSGLD, RWP (one gradient per step). Backends: 'reference' (pure
torch), 'cpp' (C++ CPU kernels), with 'auto' picking the fastest available one.
"""
from fused_flat import _native
from fused_flat.backends import available_backends
from fused_flat.langevin import FSGLD, RWP, SGLD, LangevinOptimizer

__version__ = "0.1.0"
__all__ = ["SGLD", "FSGLD", "RWP", "LangevinOptimizer", "available_backends", "__version__"]
