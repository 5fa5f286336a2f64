"""PRDP and DDPO losses against naive references written straight from the formulas."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prdp_jax.core import ddpo
from prdp_jax.core import rdp


def naive_rdp(lp, lp_old, lp_ref, rewards, B, beta, eps, reduction):
    """Plain loops: every ordered pair (a, b) of a prompt with r_a - r_b > 0, once each."""
    n, T = lp.shape
    agg = (lambda xs: sum(xs) / len(xs)) if reduction == "mean" else sum
    total, count = 0.0, 0
    for p in range(n // B):
        idx = range(p * B, (p + 1) * B)
        r_hat = {i: agg([lp[i][t] - lp_ref[i][t] for t in range(T)]) for i in idx}
        r_clip = {}
        for i in idx:
            steps = []
            for t in range(T):
                center = lp_old[i][t] - lp_ref[i][t]
                steps.append(min(max(lp[i][t] - lp_ref[i][t], center - eps), center + eps))
            r_clip[i] = agg(steps)
        for a in idx:
            for b in idx:
                dr = rewards[a] - rewards[b]
                if dr <= 0:
                    continue
                target = dr / beta
                total += max((r_hat[a] - r_hat[b] - target) ** 2, (r_clip[a] - r_clip[b] - target) ** 2)
                count += 1
    return total / max(count, 1), count


def random_inputs(seed, n=12, T=5, ties=True):
    rng = np.random.default_rng(seed)
    lp_ref = rng.normal(size=(n, T))
    lp_old = lp_ref + rng.normal(scale=0.02, size=(n, T))
    lp = lp_old + rng.normal(scale=0.02, size=(n, T))  # some steps inside the clip, some outside
    rewards = rng.normal(size=n)
    if ties:
        rewards[1] = rewards[0]  # an exact tie is not a pair
    return lp, lp_old, lp_ref, rewards


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rdp_loss_matches_naive(reduction, seed):
    lp, lp_old, lp_ref, rewards = random_inputs(seed)
    B, beta, eps = 4, 0.5, 0.015
    want, count = naive_rdp(lp, lp_old, lp_ref, rewards, B, beta, eps, reduction)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    loss, aux = rdp.rdp_loss(f32(lp), f32(lp_old), f32(lp_ref), f32(rewards), images_per_prompt=B,
                             beta=beta, clip_eps=eps, step_reduction=reduction)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert int(aux["pairs"]) == count == 3 * (4 * 3 // 2) - 1
    clipped = np.abs((lp - lp_ref) - (lp_old - lp_ref)) > eps
    assert 0 < clipped.mean() < 1
    np.testing.assert_allclose(aux["clip_frac"], clipped.mean(), rtol=1e-6)


def test_rdp_gradient_matches_naive_finite_differences():
    lp, lp_old, lp_ref, rewards = random_inputs(3, n=8, T=3)
    B, beta, eps = 4, 0.5, 0.015
    grad = jax.grad(lambda x: rdp.rdp_loss(x, lp_old, lp_ref, rewards, images_per_prompt=B,
                                           beta=beta, clip_eps=eps)[0])
    with jax.enable_x64():
        g = np.asarray(grad(jnp.asarray(lp, jnp.float64)))
    h = 1e-6
    for i, t in [(0, 0), (3, 2), (5, 1), (7, 0)]:
        up, down = lp.copy(), lp.copy()
        up[i, t] += h
        down[i, t] -= h
        fd = (naive_rdp(up, lp_old, lp_ref, rewards, B, beta, eps, "mean")[0]
              - naive_rdp(down, lp_old, lp_ref, rewards, B, beta, eps, "mean")[0]) / (2 * h)
        np.testing.assert_allclose(g[i, t], fd, rtol=1e-5, atol=1e-8)


def test_rdp_loss_is_zero_at_the_optimum():
    """r_hat differences that equal Delta r / beta exactly give loss 0 (the paper's fixed point)."""
    rng = np.random.default_rng(0)
    n, T, B, beta = 8, 4, 4, 0.1
    rewards = rng.normal(size=n)
    lp_ref = rng.normal(size=(n, T))
    lp = lp_ref + (rewards / beta)[:, None]  # mean over steps of the log-ratio = r / beta
    loss, _ = rdp.rdp_loss(jnp.float32(lp), jnp.float32(lp), jnp.float32(lp_ref), jnp.float32(rewards),
                           images_per_prompt=B, beta=beta, clip_eps=1e-6)
    assert float(loss) < 1e-8


def naive_ppo(lp, lp_old, adv, clip):
    n, T = lp.shape
    total = 0.0
    for i in range(n):
        for t in range(T):
            ratio = np.exp(lp[i][t] - lp_old[i][t])
            total += max(-adv[i] * ratio, -adv[i] * min(max(ratio, 1 - clip), 1 + clip))
    return total / (n * T)


@pytest.mark.parametrize("seed", [0, 1])
def test_ppo_loss_matches_naive(seed):
    lp, lp_old, _, _ = random_inputs(seed)
    adv = np.random.default_rng(seed + 10).normal(size=lp.shape[0])
    clip = 0.01
    loss, aux = ddpo.ppo_loss(jnp.float32(lp), jnp.float32(lp_old), jnp.float32(adv), clip_range=clip)
    np.testing.assert_allclose(loss, naive_ppo(lp, lp_old, adv, clip), rtol=1e-5)
    frac = (np.abs(np.exp(lp - lp_old) - 1) > clip).mean()
    assert 0 < frac < 1
    np.testing.assert_allclose(aux["clip_frac"], frac)


def test_infinite_clips_are_the_unclipped_objectives():
    """clip_eps = inf (PRDP) and clip_range = inf (DDPO) switch the clips off (the ablations)."""
    lp, lp_old, lp_ref, rewards = random_inputs(3)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    B, beta = 4, 0.5
    loss, aux = rdp.rdp_loss(f32(lp), f32(lp_old), f32(lp_ref), f32(rewards), images_per_prompt=B,
                             beta=beta, clip_eps=float("inf"))
    want, _ = naive_rdp(lp, lp_old, lp_ref, rewards, B, beta, 1e30, "mean")
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(loss, aux["loss_unclipped"], rtol=1e-6)
    assert float(aux["clip_frac"]) == 0.0
    adv = np.random.default_rng(4).normal(size=lp.shape[0])
    loss, aux = ddpo.ppo_loss(f32(lp), f32(lp_old), f32(adv), clip_range=float("inf"))
    np.testing.assert_allclose(loss, np.mean(-adv[:, None] * np.exp(lp - lp_old)), rtol=1e-5)
    assert float(aux["clip_frac"]) == 0.0


def naive_tracker(history, buffer_size, min_count):
    """DDPO's stat tracker, re-derived: per-prompt deques, batch stats below min_count."""
    buffers = collections.defaultdict(lambda: collections.deque(maxlen=buffer_size))
    outs = []
    for prompts, rewards in history:
        out = []
        for p in set(prompts):
            buffers[p].extend(r for q, r in zip(prompts, rewards) if q == p)
        for p, r in zip(prompts, rewards):
            if len(buffers[p]) < min_count:
                out.append((r - np.mean(rewards)) / (np.std(rewards) + 1e-6))
            else:
                out.append((r - np.mean(buffers[p])) / (np.std(buffers[p]) + 1e-6))
        outs.append(np.array(out))
    return outs


def test_stat_tracker_matches_naive_and_round_trips():
    rng = np.random.default_rng(0)
    history = []
    for step in range(6):
        prompts = [f"p{int(i)}" for i in rng.integers(0, 4, size=8)]
        history.append((prompts, rng.normal(size=8) + step))
    tracker = ddpo.PerPromptStatTracker(buffer_size=5, min_count=3)
    got = [tracker.update(p, r) for p, r in history[:3]]
    resumed = ddpo.PerPromptStatTracker(buffer_size=5, min_count=3)
    resumed.load_state_dict(tracker.state_dict())
    got += [resumed.update(p, r) for p, r in history[3:]]
    for g, w in zip(got, naive_tracker(history, 5, 3)):
        np.testing.assert_allclose(g, w, rtol=1e-5)
    # both branches were exercised
    assert any(len(b) >= 3 for b in resumed.buffers.values())


def test_batch_normalisation_and_clipping():
    r = np.array([1.0, 2.0, 3.0, 10.0])
    adv = ddpo.batch_advantages(r)
    np.testing.assert_allclose(adv, (r - r.mean()) / (r.std() + 1e-8), rtol=1e-6)
    np.testing.assert_array_equal(ddpo.clip_advantages(np.array([-9.0, 0.5, 9.0]), 5.0), [-5.0, 0.5, 5.0])
