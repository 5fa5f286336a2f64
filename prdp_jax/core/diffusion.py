"""Noise schedule and the one denoising step that both samples and scores.

The step is a Gaussian policy  pi(x_{t-1} | x_t, c) = N(mu, sigma_t^2 I)  with the DDIM(eta)
mean and standard deviation (DDPM ancestral sampling is exactly DDIM with eta = 1). The same
function draws x_{t-1} when none is given and scores a given x_{t-1} otherwise, so re-scoring a
sampled transition with the parameters that produced it gives a log-ratio of exactly zero.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from prdp_jax.infra.errors import ConfigError

BETA_SCHEDULES = ("scaled_linear", "linear")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction")
REDUCTIONS = ("mean", "sum")

# A denoiser maps (params, x [B, H, W, C], t [B] int32, context [B, L, D]) -> model output [B, H, W, C].
Denoiser = Callable[[chex.ArrayTree, jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A discrete noise schedule with diffusers' scheduler semantics.

    Attributes:
      alphas_cumprod: [num_train_timesteps] float64 numpy array, prod_{s<=t} (1 - beta_s).
      final_alpha_cumprod: alpha-bar used when the previous timestep is < 0.
      steps_offset: added to the inference timesteps ("leading" spacing), 1 for Stable Diffusion.
      timestep_spacing: "leading" (SD 1.x/2.x), "trailing" or "linspace".
      prediction_type: what the model predicts: "epsilon" or "v_prediction".
    """

    alphas_cumprod: np.ndarray
    final_alpha_cumprod: float
    steps_offset: int = 1
    timestep_spacing: str = "leading"
    prediction_type: str = "epsilon"

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def timesteps(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """Inference timesteps, noisiest first.

        Returns:
          (t, t_prev): two [num_steps] int32 arrays; t_prev = t - num_train_timesteps // num_steps
          (negative at the last step when the spacing reaches 0, meaning final_alpha_cumprod).
        """
        n = self.num_train_timesteps
        if not 1 <= num_steps <= n:
            raise ConfigError(f"sample.num_steps must be in [1, {n}], got {num_steps}")
        if self.timestep_spacing == "leading":
            ratio = n // num_steps
            t = (np.arange(num_steps) * ratio).round()[::-1] + self.steps_offset
        elif self.timestep_spacing == "trailing":
            t = np.round(np.arange(n, 0, -n / num_steps)) - 1
        else:  # linspace
            t = np.linspace(0, n - 1, num_steps).round()[::-1]
        t = t.astype(np.int32)
        t_prev = (t - n // num_steps).astype(np.int32)
        return t, t_prev

    def alpha_bars(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """alpha-bar at t and at t_prev for each inference step: two [num_steps] float64 arrays."""
        t, t_prev = self.timesteps(num_steps)
        a_t = self.alphas_cumprod[t]
        a_prev = np.where(t_prev >= 0, self.alphas_cumprod[np.maximum(t_prev, 0)],
                          self.final_alpha_cumprod)
        return a_t, a_prev


def make_schedule(beta_start: float = 0.00085, beta_end: float = 0.012,
                  beta_schedule: str = "scaled_linear", num_train_timesteps: int = 1000,
                  steps_offset: int = 1, set_alpha_to_one: bool = False,
                  timestep_spacing: str = "leading",
                  prediction_type: str = "epsilon") -> Schedule:
    """Builds a schedule; the defaults are Stable Diffusion 1.x's scheduler config."""
    if beta_schedule not in BETA_SCHEDULES:
        raise ConfigError(f"schedule.beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ConfigError(
            f"schedule.timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(
            f"schedule.prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps) ** 2
    else:
        betas = np.linspace(beta_start, beta_end, num_train_timesteps)
    # float64 throughout (diffusers uses float32; the two agree to ~1e-6).
    alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
    final = 1.0 if set_alpha_to_one else float(alphas_cumprod[0])
    return Schedule(alphas_cumprod=alphas_cumprod, final_alpha_cumprod=final,
                    steps_offset=steps_offset, timestep_spacing=timestep_spacing,
                    prediction_type=prediction_type)


@dataclasses.dataclass(frozen=True)
class StepCoefficients:
    """Per-step constants of the DDIM(eta) Gaussian policy, each a [T] float32 array over its T
    stochastic steps, and optionally a deterministic last step.

    mean = c_x * x_t + c_out * model_output;  std = sigma (> 0 for eta > 0).
    final: None, or (t, c_x, c_out) of a noise-free last step x_0 = c_x * x_t + c_out * output
      (the model's clean prediction), which is not part of the policy: it has no log-prob.
    """

    t: np.ndarray
    t_prev: np.ndarray
    c_x: np.ndarray
    c_out: np.ndarray
    sigma: np.ndarray
    final: Optional[tuple[int, float, float]] = None

    @property
    def num_stochastic(self) -> int:
        return int(self.t.shape[0])


FINAL_STEPS = ("stochastic", "deterministic")


def step_coefficients(schedule: Schedule, num_steps: int, eta: float,
                      final_step: str = "stochastic") -> StepCoefficients:
    """Folds the DDIM(eta) update into per-step affine coefficients (computed in float64).

    With alpha-bars a (at t) and a' (at t_prev) and variance v = (1-a')/(1-a) * (1 - a/a'):
      x0  = (x_t - sqrt(1-a) eps) / sqrt(a)
      mu  = sqrt(a') x0 + sqrt(1 - a' - eta^2 v) eps,   sigma = eta sqrt(v).
    final_step="deterministic" replaces the last of the `num_steps` steps by the clean prediction
    x0 (no noise, no log-prob). In a short chain that step jumps from a noisy state to alpha-bar ~1
    with a tiny sigma, so its log-prob gradient is large and carries no reward information (the
    noise it adds cannot change the image).
    """
    if not eta > 0:
        raise ConfigError(f"sample.eta must be > 0 for a stochastic policy with log-probs, got {eta}")
    if final_step not in FINAL_STEPS:
        raise ConfigError(f"sample.final_step must be one of {FINAL_STEPS}, got {final_step!r}")
    deterministic = final_step == "deterministic"
    if deterministic and num_steps < 2:
        raise ConfigError("sample.final_step='deterministic' needs sample.num_steps >= 2")
    t, t_prev = schedule.timesteps(num_steps)
    a, a_prev = schedule.alpha_bars(num_steps)
    final = None
    if deterministic:
        a_last, t_last = a[-1], int(t[-1])
        if schedule.prediction_type == "epsilon":
            final = (t_last, float(1 / np.sqrt(a_last)), float(-np.sqrt(1 - a_last) / np.sqrt(a_last)))
        else:
            final = (t_last, float(np.sqrt(a_last)), float(-np.sqrt(1 - a_last)))
        t, t_prev, a, a_prev = t[:-1], t_prev[:-1], a[:-1], a_prev[:-1]
    variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    sigma = eta * np.sqrt(variance)
    if np.any(sigma <= 0):
        raise ConfigError(
            "a sampling step has zero variance (the schedule's last step reaches alpha-bar 1, "
            "e.g. set_alpha_to_one=True), so its log-prob is undefined; set "
            "schedule.set_alpha_to_one=False or sample.final_step='deterministic'")
    dir_coef = np.sqrt(np.maximum(1 - a_prev - sigma ** 2, 0.0))
    if schedule.prediction_type == "epsilon":
        # mu = sqrt(a')/sqrt(a) x_t + (dir - sqrt(a') sqrt(1-a)/sqrt(a)) eps
        c_x = np.sqrt(a_prev / a)
        c_out = dir_coef - np.sqrt(a_prev) * np.sqrt(1 - a) / np.sqrt(a)
    else:
        # v-prediction: x0 = sqrt(a) x_t - sqrt(1-a) v;  eps = sqrt(1-a) x_t + sqrt(a) v
        c_x = np.sqrt(a_prev) * np.sqrt(a) + dir_coef * np.sqrt(1 - a)
        c_out = -np.sqrt(a_prev) * np.sqrt(1 - a) + dir_coef * np.sqrt(a)
    f32 = lambda v: np.asarray(v, np.float32)
    return StepCoefficients(t=t, t_prev=t_prev, c_x=f32(c_x), c_out=f32(c_out), sigma=f32(sigma),
                            final=final)


def guide(out_uncond: jax.Array, out_cond: jax.Array, scale: float) -> jax.Array:
    """Classifier-free guidance: out_uncond + scale * (out_cond - out_uncond)."""
    return out_uncond + scale * (out_cond - out_uncond)


def guided_output(denoiser: Denoiser, params: chex.ArrayTree, x: jax.Array, t: jax.Array,
                  context: jax.Array, uncond_context: jax.Array, scale: float) -> jax.Array:
    """The guided model output for a batch, running conditional and unconditional in one call.

    Args:
      x: [B, H, W, C] noisy latents.  t: [B] int32 timesteps.
      context: [B, L, D] prompt embeddings.  uncond_context: [B, L, D] or [1, L, D] embeddings of "".
      scale: the guidance scale; 1.0 skips the unconditional pass.
    Returns:
      [B, H, W, C] float32 guided model output.
    """
    chex.assert_rank(x, 4)
    chex.assert_rank(context, 3)
    batch = x.shape[0]
    chex.assert_shape(t, (batch,))
    if scale == 1.0:
        return denoiser(params, x, t, context).astype(jnp.float32)
    uncond = jnp.broadcast_to(uncond_context, (batch,) + uncond_context.shape[1:]).astype(context.dtype)
    out = denoiser(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                   jnp.concatenate([uncond, context])).astype(jnp.float32)
    return guide(out[:batch], out[batch:], scale)


def step(x_t: jax.Array, model_output: jax.Array, c_x: jax.Array, c_out: jax.Array,
         sigma: jax.Array, *, key: Optional[jax.Array] = None, noise: Optional[jax.Array] = None,
         x_prev: Optional[jax.Array] = None, reduce: str = "mean") -> tuple[jax.Array, jax.Array]:
    """One Gaussian denoising transition: draws x_{t-1} (given `key`) or scores a given `x_prev`.

    Args:
      x_t: [B, H, W, C] current latents.
      model_output: [B, H, W, C] guided model output (epsilon or v, per the coefficients).
      c_x, c_out, sigma: [B] or scalar step coefficients from `step_coefficients`.
      key: PRNG key used to draw x_{t-1} when `x_prev` is None.
      noise: [B, H, W, C] standard normal noise to draw x_{t-1} with, instead of `key`.
      x_prev: [B, H, W, C] a given next latent to score instead of sampling.
      reduce: "mean" or "sum" of the per-element log-density over the non-batch dimensions.
    Returns:
      (x_prev [B, H, W, C] float32, log_prob [B] float32).
    """
    chex.assert_rank(x_t, 4)
    chex.assert_equal_shape([x_t, model_output])
    expand = lambda v: jnp.reshape(jnp.asarray(v, jnp.float32), (-1, 1, 1, 1))
    c_x, c_out, sigma = expand(c_x), expand(c_out), expand(sigma)
    mean = c_x * x_t.astype(jnp.float32) + c_out * model_output.astype(jnp.float32)
    if x_prev is None:
        if noise is None:
            if key is None:
                raise ValueError("step() needs `key` or `noise` (to sample) or `x_prev` (to score)")
            noise = jax.random.normal(key, mean.shape, jnp.float32)
        x_prev = mean + sigma * noise.astype(jnp.float32)
    else:
        chex.assert_equal_shape([x_t, x_prev])
        x_prev = x_prev.astype(jnp.float32)
    log_density = (-jnp.square(x_prev - mean) / (2 * jnp.square(sigma))
                   - jnp.log(sigma) - 0.5 * math.log(2 * math.pi))
    return x_prev, reduce_over(log_density, tuple(range(1, log_density.ndim)), reduce,
                               "sample.logprob_reduction")


def reduce_over(x: jax.Array, axes, how: str, field: str) -> jax.Array:
    """The mean or sum (`how`, one of REDUCTIONS, set by config `field`) of x over `axes`."""
    if how not in REDUCTIONS:
        raise ConfigError(f"{field} must be one of {REDUCTIONS}, got {how!r}")
    return x.mean(axes) if how == "mean" else x.sum(axes)
