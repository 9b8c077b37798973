"""Benchmarks of fused_flat (micro passes, STREAM roofline, end-to-end training steps).

Run them through the command line: ``python -m fused_flat bench micro|e2e|stream [options]``,
or directly: ``python -m benchmarks.micro --quick`` from the repository root.
"""
