"""Process-level JAX setup: the persistent compilation cache (and, on pods, the distributed runtime)."""
from __future__ import annotations

import os

import jax


def enable_compilation_cache(path: str) -> None:
    """Caches compiled XLA programs on disk; repeat runs and test sessions skip most compiles."""
    if not path:
        return
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def setup(config) -> None:
    enable_compilation_cache(config.log.compile_cache)
