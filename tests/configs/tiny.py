"""The tests' tiny config as a config file, for runs of the real command line in subprocesses.

    python -m prdp_jax.main --config tests/configs/tiny.py[:ddpo] --workdir DIR

It is `conftest.tiny_config` (8x8 pixels, 4 steps, 4 prompts x 4 images, seconds per epoch) with
the tests' persistent compilation cache.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conftest import tiny_config  # noqa: E402


def get_config(recipe: str = ""):
    return tiny_config(recipe or "prdp")
