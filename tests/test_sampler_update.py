"""The scan sampler and the exact microbatched update, on a tiny real UNet."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_UNET
from prdp_jax.core import ddpo
from prdp_jax.core import diffusion
from prdp_jax.core import rdp
from prdp_jax.core import sampler
from prdp_jax.core import tiled_gradient
from prdp_jax.models.unet import UNet

UNET = UNet(**TINY_UNET)
SHAPE = (8, 8, 3)
CTX = (4, 16)
GUIDANCE = 3.0


def denoiser(params, x, t, ctx):
    return UNET.apply({"params": params}, x, t, ctx)


@functools.lru_cache(maxsize=None)
def params_pair():
    params = jax.jit(UNET.init)(jax.random.key(0), jnp.zeros((1,) + SHAPE), jnp.zeros((1,), jnp.int32),
                                jnp.zeros((1,) + CTX))["params"]
    noise = lambda k, p: p + 0.02 * jax.random.normal(k, p.shape)
    keys = iter(jax.random.split(jax.random.key(1), 1000))
    other = jax.tree.map(lambda p: noise(next(keys), p), params)
    return params, other


def sample(params, n, num_steps, seed=0):
    coeffs = diffusion.step_coefficients(diffusion.make_schedule(), num_steps, 1.0)
    ctx = jax.random.normal(jax.random.key(seed + 100), (n,) + CTX)
    uncond = jnp.zeros((1,) + CTX)
    keys = jax.random.split(jax.random.key(seed), n)
    run = jax.jit(functools.partial(sampler.sample, denoiser, coeffs=coeffs, latent_shape=SHAPE,
                                    guidance_scale=GUIDANCE))
    return run(params, context=ctx, uncond_context=uncond, keys=keys), ctx, uncond, coeffs


def test_sampler_records_the_log_probs_of_its_own_transitions():
    params, _ = params_pair()
    traj, ctx, uncond, coeffs = sample(params, 3, 5)
    assert traj.latents.shape == (3, 6) + SHAPE and traj.log_probs.shape == (3, 5)

    @jax.jit
    def rescore(latents):
        out = []
        for k in range(5):  # the same step function, scoring the stored x_{t-1}
            t = jnp.full((3,), coeffs.t[k], jnp.int32)
            eps = diffusion.guided_output(denoiser, params, latents[:, k], t, ctx, uncond, GUIDANCE)
            out.append(diffusion.step(latents[:, k], eps, coeffs.c_x[k], coeffs.c_out[k],
                                      coeffs.sigma[k], x_prev=latents[:, k + 1])[1])
        return jnp.stack(out, 1)

    np.testing.assert_allclose(rescore(traj.latents), traj.log_probs, atol=1e-5)


@pytest.mark.slow
def test_deterministic_final_step_outputs_the_clean_prediction():
    """With a deterministic last step the chain holds T-1 policy transitions (the same draws as the
    full chain's first T-1) and `final` is the last step's clean prediction, not a latent."""
    params, _ = params_pair()
    full, ctx, uncond, _ = sample(params, 3, 4)
    coeffs = diffusion.step_coefficients(diffusion.make_schedule(), 4, 1.0, final_step="deterministic")
    keys = jax.random.split(jax.random.key(0), 3)
    traj = jax.jit(functools.partial(sampler.sample, denoiser, coeffs=coeffs, latent_shape=SHAPE,
                                     guidance_scale=GUIDANCE))(
        params, context=ctx, uncond_context=uncond, keys=keys)
    assert traj.latents.shape == (3, 4) + SHAPE and traj.log_probs.shape == (3, 3)
    # The noise of step k derives from the trajectory key and k alone, whatever the chain length.
    np.testing.assert_allclose(traj.latents, full.latents[:, :4], atol=1e-5)
    np.testing.assert_allclose(traj.log_probs, full.log_probs[:, :3], atol=1e-5)
    t, c_x, c_out = coeffs.final
    out = diffusion.guided_output(denoiser, params, traj.latents[:, -1], jnp.full((3,), t, jnp.int32),
                                  ctx, uncond, GUIDANCE)
    np.testing.assert_allclose(traj.final, c_x * traj.latents[:, -1] + c_out * out, atol=1e-5)
    np.testing.assert_array_equal(full.final, full.latents[:, -1])


def test_a_trajectory_does_not_depend_on_its_batch():
    params, _ = params_pair()
    full, _, _, _ = sample(params, 4, 3, seed=7)
    coeffs = diffusion.step_coefficients(diffusion.make_schedule(), 3, 1.0)
    ctx = jax.random.normal(jax.random.key(107), (4,) + CTX)
    keys = jax.random.split(jax.random.key(7), 4)
    one = jax.jit(functools.partial(sampler.sample, denoiser, coeffs=coeffs, latent_shape=SHAPE,
                                    guidance_scale=GUIDANCE))(
        params, context=ctx[2:3], uncond_context=jnp.zeros((1,) + CTX), keys=keys[2:3])
    np.testing.assert_allclose(one.latents[0], full.latents[2], atol=1e-4)


def test_sampler_program_does_not_grow_with_steps():
    params, _ = params_pair()

    def program(num_steps):
        coeffs = diffusion.step_coefficients(diffusion.make_schedule(), num_steps, 1.0)
        fn = jax.jit(functools.partial(sampler.sample, denoiser, coeffs=coeffs, latent_shape=SHAPE,
                                       guidance_scale=GUIDANCE))
        text = fn.lower(params, context=jnp.zeros((2,) + CTX), uncond_context=jnp.zeros((1,) + CTX),
                        keys=jax.random.split(jax.random.key(0), 2)).as_text()
        return text.count("stablehlo.convolution"), text.count("stablehlo.while")

    convs, loops = program(5)
    assert program(50) == (convs, loops) and convs > 0 and loops >= 1  # traced once, in a loop


def minibatch(n=8, num_steps=5, B=4):
    params, other = params_pair()
    traj, ctx, uncond, coeffs = sample(params, n, num_steps)
    placeholder = tiled_gradient.Transitions(traj.latents, ctx, traj.log_probs, traj.log_probs,
                                   jnp.zeros(n), jnp.zeros(n))
    tiling = tiled_gradient.Tiling(n, num_steps, trajectories=n, steps=num_steps)
    score = jax.jit(functools.partial(tiled_gradient.score, denoiser, coeffs=coeffs, tiling=tiling,
                                      guidance_scale=GUIDANCE, reduce="mean"))
    old = score(params, placeholder, uncond)
    ref = score(other, placeholder, uncond)
    rewards = jax.random.uniform(jax.random.key(5), (n,))
    adv = jnp.asarray(ddpo.batch_advantages(np.asarray(rewards)))
    mb = tiled_gradient.Transitions(traj.latents, ctx, old, ref, rewards, adv)
    return mb, uncond, coeffs


OBJECTIVES = {
    "prdp-mean": lambda lp, mb: rdp.rdp_loss(lp, mb.log_probs_old, mb.log_probs_ref, mb.rewards,
                                             images_per_prompt=4, beta=0.05, clip_eps=2e-3),
    "prdp-sum": lambda lp, mb: rdp.rdp_loss(lp, mb.log_probs_old, mb.log_probs_ref, mb.rewards,
                                            images_per_prompt=4, beta=0.5, clip_eps=2e-3,
                                            step_reduction="sum"),
    "ddpo": lambda lp, mb: ddpo.ppo_loss(lp, mb.log_probs_old, mb.advantages, clip_range=2e-3),
}


def naive_loss(objective, params, mb, uncond, coeffs, reduce):
    """One pass over all n x T transitions, differentiated end to end."""
    n, T1 = mb.latents.shape[:2]
    T = T1 - 1
    flat = lambda x: x.reshape((n * T,) + x.shape[2:])
    x_t, x_prev = flat(mb.latents[:, :-1]), flat(mb.latents[:, 1:])
    tile = lambda v: jnp.tile(jnp.asarray(v), n)
    out = diffusion.guided_output(denoiser, params, x_t, tile(coeffs.t).astype(jnp.int32),
                                  jnp.repeat(mb.context, T, axis=0), uncond, GUIDANCE)
    _, lp = diffusion.step(x_t, out, tile(coeffs.c_x), tile(coeffs.c_out), tile(coeffs.sigma),
                           x_prev=x_prev, reduce=reduce)
    return objective(lp.reshape(n, T), mb)[0]


def rel_err(a, b):
    num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    den = sum(float(jnp.sum(y ** 2)) for y in jax.tree.leaves(b))
    return (num / den) ** 0.5


@pytest.mark.parametrize("objective,tile,reduce", [
    ("prdp-mean", (4, 2), "mean"),   # 2 does not divide T=5: the last step tile is padded
    pytest.param("prdp-sum", (8, 5), "sum", marks=pytest.mark.slow),
    pytest.param("ddpo", (4, 3), "mean", marks=pytest.mark.slow),
])
def test_microbatched_gradient_is_exact(objective, tile, reduce):
    mb, uncond, coeffs = minibatch()
    _, params = params_pair()
    params = jax.tree.map(lambda p: p * 1.01, params)  # theta != theta_old, != reference
    obj = OBJECTIVES[objective]
    n, T = mb.log_probs_old.shape
    tiling = tiled_gradient.Tiling(n, T, trajectories=tile[0], steps=tile[1])
    kw = dict(coeffs=coeffs, tiling=tiling, guidance_scale=GUIDANCE, reduce=reduce)
    lp = jax.jit(functools.partial(tiled_gradient.score, denoiser, **kw))(params, mb, uncond)
    loss, weights, aux = jax.jit(functools.partial(tiled_gradient.loss_and_weights, obj))(lp, mb)
    grad_step = jax.jit(functools.partial(tiled_gradient.accumulate_grad, denoiser, **kw))
    grads = jax.tree.map(jnp.zeros_like, params)
    for j, c in zip(*tiling.tile_indices()):
        grads = grad_step(params, mb, uncond, weights, j, c, grads)
    want_loss, want = jax.jit(jax.value_and_grad(functools.partial(
        naive_loss, obj, mb=mb, uncond=uncond, coeffs=coeffs, reduce=reduce)))(params)
    assert float(aux["clip_frac"]) > 0  # the clip is active in this test
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert rel_err(grads, want) < 1e-5


@pytest.mark.parametrize("objective,tile", [("prdp-mean", (4, 2)), ("ddpo", (8, 5))])
def test_one_pass_gradient_is_exact(objective, tile):
    """train.gradient="one_pass": the loss, log-probs and gradient of the end-to-end
    differentiated loss, also over a trainable subset (zeros elsewhere)."""
    mb, uncond, coeffs = minibatch()
    _, params = params_pair()
    params = jax.tree.map(lambda p: p * 1.01, params)
    obj = OBJECTIVES[objective]
    n, T = mb.log_probs_old.shape
    kw = dict(coeffs=coeffs, tiling=tiled_gradient.Tiling(n, T, trajectories=tile[0], steps=tile[1]),
              guidance_scale=GUIDANCE, reduce="mean")
    loss, lp, grads, aux = jax.jit(functools.partial(tiled_gradient.loss_and_grad, obj, denoiser,
                                                     **kw))(params, mb, uncond)
    want_loss, want = jax.jit(jax.value_and_grad(functools.partial(
        naive_loss, obj, mb=mb, uncond=uncond, coeffs=coeffs, reduce="mean")))(params)
    want_lp = jax.jit(functools.partial(tiled_gradient.score, denoiser, **kw))(params, mb, uncond)
    assert float(aux["clip_frac"]) > 0
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(lp, want_lp, rtol=1e-5, atol=1e-6)
    assert rel_err(grads, want) < 1e-5
    mask = jax.tree_util.tree_map_with_path(
        lambda path, _: "attn2" in jax.tree_util.keystr(path), params)
    _, _, subset, _ = jax.jit(functools.partial(tiled_gradient.loss_and_grad, obj, denoiser,
                                                trainable=mask, **kw))(params, mb, uncond)
    for g, s, m in zip(jax.tree.leaves(want), jax.tree.leaves(subset), jax.tree.leaves(mask)):
        if m:
            np.testing.assert_allclose(s, g, rtol=1e-4, atol=1e-5 * float(jnp.abs(g).max()))
        else:
            assert not np.any(np.asarray(s))


@pytest.mark.slow
def test_gradient_of_a_trainable_subset_is_the_full_gradient_there_and_zero_elsewhere():
    mb, uncond, coeffs = minibatch()
    _, params = params_pair()
    params = jax.tree.map(lambda p: p * 1.01, params)
    n, T = mb.log_probs_old.shape
    tiling = tiled_gradient.Tiling(n, T, trajectories=4, steps=3)
    kw = dict(coeffs=coeffs, tiling=tiling, guidance_scale=GUIDANCE, reduce="mean")
    lp = jax.jit(functools.partial(tiled_gradient.score, denoiser, **kw))(params, mb, uncond)
    _, weights, _ = tiled_gradient.loss_and_weights(OBJECTIVES["prdp-mean"], lp, mb)
    mask = jax.tree_util.tree_map_with_path(
        lambda path, _: "attn2" in jax.tree_util.keystr(path), params)
    assert 0 < sum(jax.tree.leaves(mask)) < len(jax.tree.leaves(mask))
    full, subset = (jax.tree.map(jnp.zeros_like, params) for _ in range(2))
    full_step = jax.jit(functools.partial(tiled_gradient.accumulate_grad, denoiser, **kw))
    subset_step = jax.jit(functools.partial(tiled_gradient.accumulate_grad, denoiser, **kw, trainable=mask))
    for j, c in zip(*tiling.tile_indices()):
        full = full_step(params, mb, uncond, weights, j, c, full)
        subset = subset_step(params, mb, uncond, weights, j, c, subset)
    for f, s, m in zip(jax.tree.leaves(full), jax.tree.leaves(subset), jax.tree.leaves(mask)):
        if m:
            assert float(jnp.abs(f).max()) > 0
            np.testing.assert_allclose(s, f, rtol=1e-5, atol=1e-6 * float(jnp.abs(f).max()))
        else:
            assert not np.any(np.asarray(s))


def test_on_policy_log_ratio_is_exactly_zero_when_rescored():
    mb, uncond, coeffs = minibatch()
    params, _ = params_pair()
    n, T = mb.log_probs_old.shape
    for trajs, steps in [(8, 5), (4, 2)]:
        tiling = tiled_gradient.Tiling(n, T, trajectories=trajs, steps=steps)
        lp = jax.jit(functools.partial(tiled_gradient.score, denoiser, coeffs=coeffs, tiling=tiling,
                                       guidance_scale=GUIDANCE, reduce="mean"))(params, mb, uncond)
        if (trajs, steps) == (8, 5):
            np.testing.assert_array_equal(lp, mb.log_probs_old)
        _, aux = ddpo.ppo_loss(lp, lp, mb.advantages, clip_range=1e-4)
        assert float(aux["clip_frac"]) == 0.0 and float(aux["log_ratio_old"]) == 0.0


def grad_step_temp_bytes(num_steps, images):
    _, params = params_pair()
    n = 2 * images
    coeffs = diffusion.step_coefficients(diffusion.make_schedule(), num_steps, 1.0)
    tiling = tiled_gradient.Tiling(n, num_steps, trajectories=4, steps=5)
    sds = jax.ShapeDtypeStruct
    mb = tiled_gradient.Transitions(sds((n, num_steps + 1) + SHAPE, jnp.float32), sds((n,) + CTX, jnp.float32),
                          sds((n, num_steps), jnp.float32), sds((n, num_steps), jnp.float32),
                          sds((n,), jnp.float32), sds((n,), jnp.float32))
    fn = jax.jit(functools.partial(tiled_gradient.accumulate_grad, denoiser, coeffs=coeffs, tiling=tiling,
                                   guidance_scale=GUIDANCE, reduce="mean"))
    i32 = sds((), jnp.int32)
    compiled = fn.lower(params, mb, sds((1,) + CTX, jnp.float32), sds((n, num_steps), jnp.float32),
                        i32, i32, params).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_gradient_memory_does_not_grow_with_steps_or_images():
    base = grad_step_temp_bytes(10, 4)
    assert grad_step_temp_bytes(50, 4) <= base * 1.05
    assert grad_step_temp_bytes(10, 16) <= base * 1.05
