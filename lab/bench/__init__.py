"""Benchmarks: `python -m lab bench kernels` (more suites arrive with later issues)."""
