"""The version of fused_flat (semantic versioning; CHANGELOG.md records each version)."""
__version__ = "0.2.0"
