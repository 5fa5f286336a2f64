"""Whether the scorer's precision leaves PRDP's clip meaningful (docs/stable_diffusion.md#precision).

The clip holds each per-step log pi_theta/pi_theta_old within +-eps; a scorer whose rounding
alone moves that log-ratio by more than eps makes the clip fire on rounding, not on policy change.
"""
from __future__ import annotations

from typing import Optional

import ml_collections

from prdp_jax.config import get_field

# The per-step log-ratio rounding noise of bf16 scoring: the median |log pi_theta/pi_theta_old|
# difference between bf16 and float32 scorers on the same transitions after every weight moved
# by +-1e-5, measured at Stable Diffusion 1.5's widths by `python -m benchmarks.precision`
# (docs/precision.md; tests/test_paper_recipes.py holds this value to that record).
BF16_SCORING_NOISE = 8e-3


def warning(c: ml_collections.ConfigDict) -> Optional[str]:
    """One line when the scorer's precision makes the run's clip meaningless (bf16 scoring with
    a clip below its measured rounding noise), else None."""
    if (c.model.get("score_dtype", "") or c.model.dtype) != "bfloat16":
        return None
    field = "prdp.clip_eps" if c.method == "prdp" else "ddpo.clip_range"
    clip = get_field(c, field)
    if not clip < BF16_SCORING_NOISE:
        return None
    which = "model.score_dtype" if c.model.get("score_dtype", "") else "model.dtype"
    return (f"{which}=bfloat16 scores transitions in bf16, whose rounding alone moves a per-step "
            f"log-ratio by ~{BF16_SCORING_NOISE:.0e} (median, measured at SD 1.5's widths: "
            f"docs/precision.md), above {field}={clip:g}: the clip will fire on rounding, not "
            f"on policy change; score in float32 with --config.model.score_dtype=float32 "
            f"--config.train.rescore_old=True")
