"""Algorithm 1 of PRDP (Deng et al., CVPR 2024), and DDPO in the same loop.

    theta <- theta_ref
    for epoch in 1..E:
        theta_old <- theta
        sample N prompts; for each, sample B trajectories from pi_theta_old
            (store x_t, x_{t-1}, t, log pi_theta_old and log pi_ref per step)
        score all N*B images with the reward model
        for k in 1..K:
            L <- mean over prompts and their valid pairs of the clipped max loss
            AdamW step on theta

`train_epoch` is the body of the epoch loop; `loop.train_and_evaluate` runs it E times with
checkpoints, metrics and evaluation around it.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import jax
import ml_collections
import numpy as np

from prdp_jax.core import ddpo
from prdp_jax.infra.errors import NonFiniteError
from prdp_jax.infra.progress import progress
from prdp_jax.rewards import combine as rewards_lib
from prdp_jax.training.epoch import (EpochSamples, Setup, known_log_probs, minibatch_gradient,
                                     reshuffle, sample_and_reward, score_transitions)
from prdp_jax.training.state import TrainState, epoch_key
from prdp_jax.training.steps import NONFINITE


def advantages_for(config: ml_collections.ConfigDict, tracker: Optional[ddpo.PerPromptStatTracker],
                   prompts: list[str], rewards: np.ndarray) -> np.ndarray:
    """[N*B] DDPO advantages of the rewards (zeros for PRDP, which regresses on rewards)."""
    if config.method != "ddpo":
        return np.zeros_like(rewards)
    traj_prompts = [prompts[g // config.train.images_per_prompt] for g in range(rewards.size)]
    if config.ddpo.normalization == "per_prompt":
        adv = tracker.update(traj_prompts, rewards)
    else:
        adv = ddpo.batch_advantages(rewards)
    return ddpo.clip_advantages(adv, config.ddpo.adv_clip_max)


def check_finite_rewards(epoch: int, rewards: np.ndarray) -> None:
    """Raises `NonFiniteError` if a reward of the epoch is NaN or infinite."""
    if not np.isfinite(rewards).all():
        bad = rewards[~np.isfinite(rewards)]
        raise NonFiniteError(f"epoch {epoch + 1}: the reward is not finite for {bad.size} of "
                             f"{rewards.size} images (e.g. {bad[0]}); check the reward model and "
                             f"reward.weights")


def check_finite(epoch: int, records: list[dict]) -> None:
    """Raises `NonFiniteError` if an optimiser step of the epoch was refused (`steps.apply`)."""
    for step, r in enumerate(records):
        if int(r["nonfinite"]):
            what = NONFINITE[int(r["nonfinite"])]
            value = r["loss"] if int(r["nonfinite"]) == 1 else r["grad_norm"]
            raise NonFiniteError(
                f"epoch {epoch + 1}, optimiser step {step + 1}: {what} is not finite"
                + (f" ({float(value)})" if int(r["nonfinite"]) < 3 else "")
                + "; the update was refused")


def train_epoch(setup: Setup, state: TrainState, frozen, ref_params, prompts: list[str],
                epoch: int, reward_fn: rewards_lib.Reward,
                tracker: Optional[ddpo.PerPromptStatTracker] = None, show_progress: bool = True,
                stop_sampling: Optional[Callable[[], bool]] = None,
                stop_updates: Optional[Callable[[], bool]] = None,
                ) -> Optional[tuple[TrainState, EpochSamples, dict]]:
    """One epoch of Algorithm 1 on the N `prompts`: (new state, the samples, metrics), or None
    when a stop was asked for (the stop callables are polled after each sampler batch and each
    optimiser step; an abandoned update leaves `state`'s buffers donated: resume from disk)."""
    config, steps = setup.config, setup.steps
    K, M = config.train.passes_per_epoch, setup.shape.minibatches
    theta_old = state.params                                  # theta_old <- theta
    offline = config.train.sampling == "offline"              # (offline RDP samples pi_ref)
    # SAMPLING: B trajectories x_T..x_0 per prompt c from pi_theta_old (log pi_theta_old per
    # step recorded), and the black-box reward r(x_0, c) of every image.
    samples = sample_and_reward(setup, ref_params if offline else theta_old, frozen, prompts,
                                epoch_key(state, epoch, setup.shardings.replicated), reward_fn,
                                epoch, show_progress, stop_sampling)
    if samples is None:
        return None
    check_finite_rewards(epoch, samples.rewards)
    advantages = advantages_for(config, tracker, prompts, samples.rewards)   # DDPO only
    # log pi_theta_old(x_{t-1} | x_t, c) and log pi_ref(x_{t-1} | x_t, c) of every transition,
    # in pass 1's shuffled minibatches of N/M prompts x B images.
    data, info = score_transitions(setup, theta_old, ref_params, samples, advantages, epoch)
    # TRAINING: K passes over the epoch's prompts, one AdamW step per minibatch.
    t0 = time.perf_counter()
    params, opt_state, records = theta_old, state.opt_state, []
    for k, m in progress([(k, m) for k in range(K) for m in range(M)],
                         desc=f"epoch {epoch + 1} update", leave=False, enabled=show_progress):
        if k > 0 and m == 0:
            data = reshuffle(setup, data, epoch, k)
        # L(theta): the clipped max RDP loss (or DDPO's clipped surrogate) of minibatch m, and
        # its exact gradient, tile by tile; at the epoch's first step theta = theta_old.
        loss, grads, aux = minibatch_gradient(setup, params, data, samples.uncond, m,
                                              known_log_probs(setup, data) if k == m == 0 else None)
        params, opt_state, grad_norm, nonfinite = steps.apply(params, opt_state, grads, loss)  # AdamW
        records.append(dict(loss=loss, grad_norm=grad_norm, nonfinite=nonfinite, **aux))
        if stop_updates is not None and stop_updates():
            return None
    records = jax.device_get(records)
    check_finite(epoch, records)
    metrics = {k: float(np.mean([r[k] for r in records])) for k in records[0] if k != "nonfinite"}
    if K > 1:  # the clip binds from the second pass on: its fraction pass by pass
        metrics.update({f"clip_frac/pass{k + 1}": float(np.mean([r["clip_frac"] for r in
                                                                 records[k * M:(k + 1) * M]]))
                        for k in range(K)})
    metrics.update(info, update_time=time.perf_counter() - t0)
    return state.replace(params=params, opt_state=opt_state), samples, metrics
