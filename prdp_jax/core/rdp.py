"""The PRDP objective: proximal reward difference prediction (Deng et al., CVPR 2024, Sec. 4).

For trajectories a, b of the same prompt, the summed (or averaged) per-step log-ratio to the frozen
reference, r_hat = agg_t [log pi_theta - log pi_ref], must predict (r(a) - r(b)) / beta. Each
step's log-ratio is also clipped to within +-eps of the snapshot theta_old's, and each pair takes
the larger of the clipped and unclipped squared errors. Pairs are every unordered within-prompt pair
with a strictly positive reward difference; the loss averages over all valid pairs of the batch.

The loss is written as a function of the per-step log-probs, so the update can take its exact
gradient with respect to them (the per-transition weights) and then backpropagate through the
model one microbatch of transitions at a time.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from prdp_jax.core import diffusion
from prdp_jax.infra.errors import ConfigError

def aggregate_steps(x: jax.Array, reduction: str) -> jax.Array:
    """[n, T] -> [n], mean or sum over steps."""
    return diffusion.reduce_over(x, -1, reduction, "prdp.step_reduction")


def rdp_loss(log_probs: jax.Array, log_probs_old: jax.Array, log_probs_ref: jax.Array,
             rewards: jax.Array, *, images_per_prompt: int, beta: float, clip_eps: float,
             step_reduction: str = "mean") -> tuple[jax.Array, dict]:
    """The clipped RDP loss of one batch of prompts.

    Args:
      log_probs: [n, T] float32 log pi_theta of each stored transition (the variable).
      log_probs_old: [n, T] log pi_theta_old (the sampling snapshot).
      log_probs_ref: [n, T] log pi_ref (the frozen reference).
      rewards: [n] raw rewards. Trajectories come in contiguous groups of `images_per_prompt`,
        one group per prompt; n must be a multiple of it.
      beta: KL coefficient; the regression target is Delta r / beta.
      clip_eps: per-step proximal clip around theta_old's log-ratio.
      step_reduction: "mean" or "sum" over steps of the per-step log-ratios.
    Returns:
      (loss scalar, aux dict of scalars).
    """
    chex.assert_rank([log_probs, log_probs_old, log_probs_ref, rewards], [2, 2, 2, 1])
    chex.assert_equal_shape([log_probs, log_probs_old, log_probs_ref])
    n, _ = log_probs.shape
    chex.assert_shape(rewards, (n,))
    if n % images_per_prompt:
        raise ConfigError(f"{n} trajectories are not whole groups of {images_per_prompt} per prompt")
    ratio = log_probs - log_probs_ref
    ratio_old = log_probs_old - log_probs_ref
    ratio_clipped = jnp.clip(ratio, ratio_old - clip_eps, ratio_old + clip_eps)
    groups = lambda v: v.reshape(n // images_per_prompt, images_per_prompt)
    r_hat = groups(aggregate_steps(ratio, step_reduction))
    r_hat_clipped = groups(aggregate_steps(ratio_clipped, step_reduction))
    r = groups(rewards.astype(jnp.float32))
    pairwise = lambda v: v[:, :, None] - v[:, None, :]  # [P, B, B]: entry (a, b) = v_a - v_b
    target = pairwise(r) / beta
    err = jnp.square(pairwise(r_hat) - target)
    err_clipped = jnp.square(pairwise(r_hat_clipped) - target)
    valid = pairwise(r) > 0
    count = valid.sum()
    per_pair = jnp.maximum(err, err_clipped)
    loss = jnp.where(valid, per_pair, 0.0).sum() / jnp.maximum(count, 1)
    aux = {
        "pairs": count,
        "loss_unclipped": jnp.where(valid, err, 0.0).sum() / jnp.maximum(count, 1),
        "clip_frac": (jnp.abs(ratio - ratio_old) > clip_eps).mean(),
        "log_ratio_ref": ratio.mean(),
        "log_ratio_old": (log_probs - log_probs_old).mean(),
    }
    return loss, aux
