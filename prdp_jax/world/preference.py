"""The world's preference reward: the counterpart of HPSv2 or PickScore.

A black-box score in [0, 1] that a person looking at the image and its caption might give: half
graded caption alignment (`alignment.py`: partial credit per attribute), half prompt-agnostic
image quality (`quality.py`). Both are also registered alone, so a run can weight them as it likes
(`reward.weights`), or train on quality and keep alignment as the gold reward it never sees.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from prdp_jax.rewards.registry import Reward, register
from prdp_jax.world.alignment import alignment_scores
from prdp_jax.world.quality import quality_scores

ALIGNMENT_WEIGHT = 0.5


def preference_scores(images: np.ndarray, captions: Sequence[str]) -> tuple[np.ndarray, dict]:
    """[B, H, W, 3] images and B captions -> ([B] preference, {component: [B]}): the components
    are 'alignment', 'quality' and each of their checks."""
    align, align_info = alignment_scores(images, captions)
    qual, qual_info = quality_scores(images)
    value = ALIGNMENT_WEIGHT * align + (1 - ALIGNMENT_WEIGHT) * qual
    info = {"alignment": align, "quality": qual, **align_info, **qual_info}
    return value.astype(np.float32), info


@register("preference")
def preference(config=None) -> Reward:
    """The world's preference reward in [0, 1]: half alignment, half quality."""
    return Reward(lambda images, prompts, metadata: preference_scores(images, prompts))
