"""The DDPO baseline (Black et al., 2023): PPO-clip on per-step likelihood ratios.

Advantages are rewards normalised per prompt by a running stat tracker (with a fallback to batch
statistics for prompts seen too few times) or over the whole batch, then clipped. The loss is a
function of the per-step log-probs, like PRDP's, so both share the same exact microbatched update.
"""
from __future__ import annotations

import collections
from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from prdp_jax.infra.errors import ConfigError

NORMALIZATIONS = ("per_prompt", "batch")


def ppo_loss(log_probs: jax.Array, log_probs_old: jax.Array, advantages: jax.Array, *,
             clip_range: float) -> tuple[jax.Array, dict]:
    """PPO's clipped surrogate, averaged over trajectories and steps.

    Args:
      log_probs: [n, T] float32 log pi_theta of each stored transition (the variable).
      log_probs_old: [n, T] log pi_theta_old (the sampling snapshot).
      advantages: [n] per-trajectory advantages (already normalised and clipped).
      clip_range: the ratio is clipped to [1 - clip_range, 1 + clip_range].
    Returns:
      (loss scalar, aux dict of scalars).
    """
    chex.assert_rank([log_probs, log_probs_old, advantages], [2, 2, 1])
    chex.assert_equal_shape([log_probs, log_probs_old])
    chex.assert_shape(advantages, (log_probs.shape[0],))
    ratio = jnp.exp(log_probs - log_probs_old)
    adv = advantages.astype(jnp.float32)[:, None]
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = jnp.maximum(unclipped, clipped).mean()
    aux = {
        "clip_frac": (jnp.abs(ratio - 1.0) > clip_range).mean(),
        "approx_kl": 0.5 * jnp.square(log_probs - log_probs_old).mean(),
        "log_ratio_old": (log_probs - log_probs_old).mean(),
    }
    return loss, aux


class PerPromptStatTracker:
    """Running per-prompt reward statistics (DDPO's stat tracker).

    Each prompt keeps its last `buffer_size` rewards. A prompt with fewer than `min_count`
    rewards in its buffer (after adding this batch) is normalised with the whole batch's
    mean and std instead. The state is plain JSON (prompt -> list of float) for checkpoints.
    """

    def __init__(self, buffer_size: int, min_count: int):
        if buffer_size < 1 or min_count < 1:
            raise ConfigError(f"ddpo.buffer_size and ddpo.min_count must be >= 1, "
                              f"got {buffer_size} and {min_count}")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, collections.deque] = {}

    def update(self, prompts: Sequence[str], rewards: np.ndarray) -> np.ndarray:
        """Adds a batch and returns its advantages, [n] float32 (std + 1e-6 in the denominator)."""
        rewards = np.asarray(rewards, np.float64)
        prompts = np.asarray(prompts, dtype=object)
        advantages = np.empty_like(rewards)
        for prompt in dict.fromkeys(prompts.tolist()):  # unique, in first-seen order
            idx = prompts == prompt
            buf = self.buffers.setdefault(prompt, collections.deque(maxlen=self.buffer_size))
            buf.extend(rewards[idx].tolist())
            if len(buf) < self.min_count:
                mean, std = rewards.mean(), rewards.std() + 1e-6
            else:
                mean, std = np.mean(buf), np.std(buf) + 1e-6
            advantages[idx] = (rewards[idx] - mean) / std
        return advantages.astype(np.float32)

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "buffers": {k: list(v) for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {k: collections.deque(v, maxlen=self.buffer_size)
                        for k, v in state["buffers"].items()}

    def stats(self) -> dict:
        return {"tracked_prompts": len(self.buffers),
                "mean_buffer": float(np.mean([len(v) for v in self.buffers.values()]))
                if self.buffers else 0.0}


def batch_advantages(rewards: np.ndarray) -> np.ndarray:
    """Whole-batch normalisation: (r - mean) / (std + 1e-8), [n] float32."""
    rewards = np.asarray(rewards, np.float64)
    return ((rewards - rewards.mean()) / (rewards.std() + 1e-8)).astype(np.float32)


def clip_advantages(advantages: np.ndarray, max_abs: float) -> np.ndarray:
    return np.clip(advantages, -max_abs, max_abs).astype(np.float32)
