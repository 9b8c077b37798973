"""Runnable examples: ``python -m fused_flat.examples.<name> --help``."""
