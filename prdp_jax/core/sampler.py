"""The trajectory sampler: the whole denoising chain as one `jax.lax.scan`.

Each scan step calls `diffusion.step` (the same function the update uses to score a stored
transition), so the per-step log-probs it records are exactly those of the sampling policy.
Compile time does not grow with the number of steps: the scan body is traced once.
"""
from __future__ import annotations

from typing import Optional

import chex
import flax
import jax
import jax.numpy as jnp

from prdp_jax.core import diffusion


@flax.struct.dataclass
class Trajectory:
    """A batch of denoising chains.

    Attributes:
      latents: [B, T+1, H, W, C] float32, x_T (pure noise) first. Transition k is
        (x_t, x_{t-1}) = (latents[:, k], latents[:, k+1]) at timestep coefficients index k; the T
        transitions are the policy's stochastic steps.
      log_probs: [B, T] float32, log pi(x_{t-1} | x_t, c) under the sampling parameters.
      final: [B, H, W, C] the samples x_0: latents[:, -1], or the deterministic last step's clean
        prediction from it when the coefficients have one.
    """

    latents: jax.Array
    log_probs: jax.Array
    final: jax.Array

    @property
    def x_t(self) -> jax.Array:
        """[B, T, H, W, C] the state before each transition."""
        return self.latents[:, :-1]

    @property
    def x_prev(self) -> jax.Array:
        """[B, T, H, W, C] the state after each transition."""
        return self.latents[:, 1:]


INIT_NOISE = 2 ** 32 - 1  # the fold-in index of the initial noise (steps use 0 .. T-1)


def sample(denoiser: diffusion.Denoiser, params: chex.ArrayTree,
           coeffs: diffusion.StepCoefficients, context: jax.Array, uncond_context: jax.Array,
           keys: jax.Array, *, latent_shape: tuple[int, int, int], guidance_scale: float,
           reduce: str = "mean", constrain: Optional[callable] = None) -> Trajectory:
    """Samples a batch of trajectories with classifier-free guidance.

    Args:
      denoiser: (params, x [B,H,W,C], t [B], context [B,L,D]) -> model output [B,H,W,C].
      coeffs: the per-step policy coefficients (`diffusion.step_coefficients`): T stochastic
        steps, then the deterministic last step if it has one.
      context: [B, L, D] prompt embeddings, one row per trajectory.
      uncond_context: [1, L, D] embedding of the empty prompt.
      keys: [B] PRNG keys, one per trajectory; its initial noise and every step's noise derive
        from it alone, so a trajectory does not depend on the batch it is sampled in.
      latent_shape: (H, W, C) of one latent.
      guidance_scale: classifier-free guidance scale (1.0 = no guidance).
      reduce: "mean" or "sum" of the log-density over latent elements.
      constrain: optional fn applied to batch-leading arrays (a sharding constraint).
    Returns:
      A Trajectory with latents [B, T+1, H, W, C], log_probs [B, T] and final [B, H, W, C].
    """
    chex.assert_rank(context, 3)
    constrain = constrain or (lambda x: x)
    batch = context.shape[0]
    num_steps = coeffs.t.shape[0]
    chex.assert_shape(keys, (batch,))
    shape = tuple(latent_shape)
    normal = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))
    # x_T from fold_in(key, INIT), step k's noise from fold_in(key, k): a chain's draws do not
    # depend on its length, so chains that share a prefix of steps share its noise.
    x_init = constrain(normal(jax.vmap(jax.random.fold_in, (0, None))(keys, INIT_NOISE)))
    xs = (jnp.asarray(coeffs.t), jnp.asarray(coeffs.c_x), jnp.asarray(coeffs.c_out),
          jnp.asarray(coeffs.sigma), jnp.arange(num_steps))

    def body(x, step_xs):
        t, c_x, c_out, sigma, k = step_xs
        out = diffusion.guided_output(denoiser, params, x, jnp.full((batch,), t, jnp.int32),
                                      context, uncond_context, guidance_scale)
        noise = constrain(normal(jax.vmap(jax.random.fold_in, (0, None))(keys, k)))
        x_prev, log_prob = diffusion.step(x, out, c_x, c_out, sigma, noise=noise, reduce=reduce)
        x_prev = constrain(x_prev)
        return x_prev, (x_prev, log_prob)

    x_last, (chain, log_probs) = jax.lax.scan(body, x_init, xs)
    latents = jnp.concatenate([x_init[:, None], jnp.moveaxis(chain, 0, 1)], axis=1)
    final = x_last
    if coeffs.final is not None:
        t, c_x, c_out = coeffs.final
        out = diffusion.guided_output(denoiser, params, x_last, jnp.full((batch,), t, jnp.int32),
                                      context, uncond_context, guidance_scale)
        final = constrain(c_x * x_last + c_out * out)
    return Trajectory(latents=constrain(latents), log_probs=constrain(log_probs.T), final=final)
