"""Module helpers: BatchNorm running statistics around perturbed forward passes (fused_flat.nn.bn)."""
from fused_flat.nn.bn import disable_running_stats, enable_running_stats, running_stats_frozen

__all__ = ["disable_running_stats", "enable_running_stats", "running_stats_frozen"]
