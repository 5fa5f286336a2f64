"""The noise schedule and the one step function: closed forms and the diffusers reference."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from prdp_jax.core import diffusion
from prdp_jax.infra.errors import ConfigError

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
          set_alpha_to_one=False, clip_sample=False)


def reference_scheduler(num_steps, **kw):
    sched = DDIMScheduler(**{**SD, **kw})
    sched.set_timesteps(num_steps)
    return sched


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [10, 50])
def test_schedule_matches_diffusers(spacing, num_steps):
    ours = diffusion.make_schedule(timestep_spacing=spacing)
    ref = reference_scheduler(num_steps, timestep_spacing=spacing)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5)
    t, t_prev = ours.timesteps(num_steps)
    np.testing.assert_array_equal(t, ref.timesteps.numpy())
    np.testing.assert_array_equal(t_prev, t - 1000 // num_steps)


def closed_form(x_t, eps, x_prev, a_t, a_prev, eta):
    """log N(x_prev; mu, sigma^2) per element, straight from the DDIM(eta) formulas (float64)."""
    x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * math.sqrt(var)
    mu = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - std ** 2) * eps
    return -((x_prev - mu) ** 2) / (2 * std ** 2) - math.log(std) - 0.5 * math.log(2 * math.pi), mu, std


@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_log_prob_closed_form(eta, reduce):
    sched = diffusion.make_schedule()
    coeffs = diffusion.step_coefficients(sched, 20, eta)
    a_t, a_prev = sched.alpha_bars(20)
    rng = np.random.default_rng(0)
    for k in (0, 7, 19):
        x_t = rng.normal(size=(3, 4, 4, 2))
        eps = rng.normal(size=x_t.shape)
        x_prev = rng.normal(size=x_t.shape) * 0.5 + x_t * 0.9
        dens, _, _ = closed_form(x_t, eps, x_prev, a_t[k], a_prev[k], eta)
        want = dens.reshape(3, -1).mean(1) if reduce == "mean" else dens.reshape(3, -1).sum(1)
        _, got = diffusion.step(jnp.float32(x_t), jnp.float32(eps), coeffs.c_x[k], coeffs.c_out[k],
                                coeffs.sigma[k], x_prev=jnp.float32(x_prev), reduce=reduce)
        chex.assert_shape(got, (3,))
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * (1 if reduce == "mean" else 32))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [1.0, 0.3])
def test_sampling_step_matches_diffusers_ddim(prediction_type, eta):
    """With the same noise, our step draws exactly diffusers' DDIMScheduler.step sample."""
    num_steps = 25
    ref = reference_scheduler(num_steps, prediction_type=prediction_type)
    coeffs = diffusion.step_coefficients(diffusion.make_schedule(prediction_type=prediction_type),
                                         num_steps, eta)
    rng = np.random.default_rng(1)
    for k in (0, 12, 24):
        x_t, out, noise = (rng.normal(size=(2, 4, 4, 3)).astype(np.float32) for _ in range(3))
        want = ref.step(torch.from_numpy(out), int(ref.timesteps[k]), torch.from_numpy(x_t), eta=eta,
                        variance_noise=torch.from_numpy(noise)).prev_sample.numpy()
        got, _ = diffusion.step(jnp.asarray(x_t), jnp.asarray(out), coeffs.c_x[k], coeffs.c_out[k],
                                coeffs.sigma[k], noise=jnp.asarray(noise))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_deterministic_final_step_is_the_clean_prediction(prediction_type):
    """final_step='deterministic': the first T-1 steps are unchanged policy steps, and the last one
    outputs exactly diffusers' pred_original_sample (x0) at the last timestep."""
    num_steps = 10
    sched = diffusion.make_schedule(prediction_type=prediction_type)
    full = diffusion.step_coefficients(sched, num_steps, 1.0)
    det = diffusion.step_coefficients(sched, num_steps, 1.0, final_step="deterministic")
    assert det.num_stochastic == num_steps - 1 and full.final is None
    for name in ("t", "t_prev", "c_x", "c_out", "sigma"):
        np.testing.assert_array_equal(getattr(det, name), getattr(full, name)[:-1])
    ref = reference_scheduler(num_steps, prediction_type=prediction_type)
    t, c_x, c_out = det.final
    assert t == int(ref.timesteps[-1])
    rng = np.random.default_rng(2)
    x_t, out = (rng.normal(size=(2, 4, 4, 3)).astype(np.float32) for _ in range(2))
    want = ref.step(torch.from_numpy(out), t, torch.from_numpy(x_t), eta=1.0,
                    variance_noise=torch.zeros(2, 4, 4, 3)).pred_original_sample.numpy()
    np.testing.assert_allclose(c_x * x_t + c_out * out, want, rtol=1e-5, atol=2e-5)
    with pytest.raises(ConfigError, match="final_step must be one of"):
        diffusion.step_coefficients(sched, num_steps, 1.0, final_step="nope")


def test_ddpm_is_ddim_eta_one():
    """DDPM's posterior q(x_{t-1} | x_t, x0) with 'fixed_small' variance is DDIM with eta = 1."""
    sched = diffusion.make_schedule()
    coeffs = diffusion.step_coefficients(sched, 50, 1.0)
    a, a_prev = sched.alpha_bars(50)
    alpha = a / a_prev
    beta = 1 - alpha
    # mu = c0 * x0 + c1 * x_t with x0 = (x_t - sqrt(1-a) eps) / sqrt(a)
    c0 = np.sqrt(a_prev) * beta / (1 - a)
    c1 = np.sqrt(alpha) * (1 - a_prev) / (1 - a)
    np.testing.assert_allclose(coeffs.c_x, c0 / np.sqrt(a) + c1, rtol=1e-6)
    np.testing.assert_allclose(coeffs.c_out, -c0 * np.sqrt(1 - a) / np.sqrt(a), rtol=1e-5)
    np.testing.assert_allclose(coeffs.sigma, np.sqrt((1 - a_prev) / (1 - a) * beta), rtol=1e-6)


def test_rescoring_a_sampled_transition_gives_log_ratio_exactly_zero():
    coeffs = diffusion.step_coefficients(diffusion.make_schedule(), 10, 1.0)
    x_t = jax.random.normal(jax.random.key(0), (5, 8, 8, 3))
    out = jax.random.normal(jax.random.key(1), x_t.shape)

    @jax.jit
    def sample_then_score(key):
        x_prev, lp = diffusion.step(x_t, out, coeffs.c_x[3], coeffs.c_out[3], coeffs.sigma[3], key=key)
        _, lp2 = diffusion.step(x_t, out, coeffs.c_x[3], coeffs.c_out[3], coeffs.sigma[3], x_prev=x_prev)
        return lp, lp2

    for seed in range(3):
        lp, lp2 = sample_then_score(jax.random.key(seed))
        np.testing.assert_array_equal(lp - lp2, np.zeros(5))


def test_guidance_uses_the_guided_mean():
    def denoiser(params, x, t, ctx):
        return x * params + ctx.mean(axis=(1, 2))[:, None, None, None] + t[:, None, None, None]

    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    t = jnp.array([5, 7])
    cond = jax.random.normal(jax.random.key(1), (2, 3, 6))
    uncond = jnp.zeros((1, 3, 6))
    got = diffusion.guided_output(denoiser, 2.0, x, t, cond, uncond, 4.0)
    e_c, e_u = denoiser(2.0, x, t, cond), denoiser(2.0, x, t, jnp.zeros((2, 3, 6)))
    np.testing.assert_allclose(got, e_u + 4.0 * (e_c - e_u), rtol=1e-6)


def test_zero_variance_step_is_refused():
    sched = diffusion.make_schedule(set_alpha_to_one=True, timestep_spacing="trailing")
    with pytest.raises(ConfigError, match="zero variance"):
        diffusion.step_coefficients(sched, 10, 1.0)
    with pytest.raises(ConfigError, match="eta"):
        diffusion.step_coefficients(diffusion.make_schedule(), 10, 0.0)
