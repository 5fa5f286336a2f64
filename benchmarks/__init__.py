"""Benchmarks: our JAX trainer against a faithful PyTorch implementation on the same weights.

    python -m benchmarks            # every measurement (tens of minutes on 2 CPU cores)
    python -m benchmarks --quick    # the CI smoke: every code path once, about a minute

Writes docs/benchmarks.json and docs/benchmarks.md (or --out). See `__main__.py`.
"""
