"""`train_and_evaluate`: Algorithm 1's epochs with checkpoints, metrics, grids and evaluation.

Start-up follows the same order on every run: check the config, prompts and evaluation sets;
build the pipeline and the steps; restore the latest checkpoint (or initialise); compile the steps
ahead of time; evaluate the reference once. Then E epochs of `algorithm.train_epoch`, each
followed by its metrics row, a sample grid every few epochs and a checkpoint; then the final
evaluation against the reference. SIGTERM stops the run at the next safe point with its progress
saved (`Bookkeeping`).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Optional

import jax
import ml_collections
import numpy as np

from prdp_jax import config as config_lib
from prdp_jax.core import ddpo
from prdp_jax.infra import files
from prdp_jax.infra import metrics as metrics_lib
from prdp_jax.infra import sharding
from prdp_jax.infra.errors import ConfigError, NonFiniteError, UserError
from prdp_jax.infra.progress import progress
from prdp_jax.pipelines.factory import build_pipeline
from prdp_jax.prompts import sets as prompt_sets
from prdp_jax.rewards import combine as rewards_lib
from prdp_jax.training import checkpoint as ckpt_lib
from prdp_jax.training import evaluation
from prdp_jax.training import precision
from prdp_jax.training import preemption
from prdp_jax.training.algorithm import train_epoch
from prdp_jax.training.epoch import EpochSamples, Setup, compile_setup, make_setup
from prdp_jax.training.state import TrainState, trainable_count


@dataclasses.dataclass
class Bookkeeping:
    """Which epoch is on disk, and what a stop may abandon.

    An epoch's updates may be abandoned on a stop only if the state at its start is saved;
    otherwise the epoch finishes and is saved. A stop before an epoch's updates saves that
    epoch's start (unless it is already on disk or no epoch has run).
    """

    checkpointer: ckpt_lib.Checkpointer
    saved: Optional[int]          # the last epoch whose state is on disk (None: none)

    def may_abandon_updates(self, epoch: int) -> bool:
        return self.saved == epoch

    def save(self, done: int, state: TrainState, meta: dict) -> None:
        self.checkpointer.save(done, state, meta)
        self.saved = done

    def save_stopped(self, epoch: int, state: TrainState, meta: dict) -> None:
        """After a stop before `epoch`'s updates: `state` still holds `epoch` done epochs."""
        if epoch > 0 and self.saved != epoch:
            self.save(epoch, state, meta)

    def kept(self) -> str:
        """Where the last good state is (said when a run stops on an error)."""
        if not self.saved:
            return "no checkpoint was written"
        return f"the last good checkpoint, epoch {self.saved}, is kept in {self.checkpointer.directory}"

    def preempted(self, epoch: int) -> preemption.Preempted:
        where = (f"the checkpoint of epoch {self.saved} is in {self.checkpointer.directory}"
                 if self.saved else "no epoch had finished")
        return preemption.Preempted(f"stopped by SIGTERM in epoch {epoch + 1}; {where}; rerun "
                                    f"the same command to resume")


def prepare_workdir(workdir: str) -> str:
    """The absolute workdir, created and checked writable."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-probe-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"workdir {workdir} cannot be written ({e.strerror}); "
                          f"pass a writable --workdir") from None
    return workdir


def summary(setup: Setup) -> list[str]:
    """The run's shape in a few lines (printed at start)."""
    c, t, shape = setup.config, setup.config.train, setup.shape
    B, N, T = shape.images_per_prompt, shape.prompts, setup.num_steps
    pairs = B * (B - 1) // 2
    abstract = setup.pipe.abstract_unet_params
    n_params = trainable_count("", abstract)
    til = setup.ctx.tiling
    trainable = (f", finetuning {trainable_count(t.trainable, abstract) / 1e6:.3f}M "
                 f"(train.trainable={t.trainable!r})" if t.trainable else "")
    lines = [
        f"{c.method.upper()} | {len(setup.mesh.devices.flat)} device(s), mesh "
        + " ".join(f"{k}={v}" for k, v in setup.mesh.shape.items())
        + f" | {jax.process_count()} process(es) | UNet {n_params / 1e6:.2f}M params" + trainable,
        f"epoch: {N} prompts x {B} images = {shape.trajectories} trajectories x {T} steps = "
        f"{shape.trajectories * T:,} transitions"
        + (" (+ a deterministic last step)" if setup.ctx.coeffs.final else "")
        + f", sampled in batches of {shape.sample_batch}",
        f"updates: {t.passes_per_epoch} pass(es) x {shape.minibatches} minibatch(es) of "
        f"{t.prompts_per_minibatch} prompts = {t.passes_per_epoch * shape.minibatches} "
        f"optimizer steps per epoch",
    ]
    if c.method == "prdp":
        lines.append(f"pairs: up to {pairs} per prompt, {pairs * N:,} per epoch "
                     f"(those with a positive reward difference count); beta={c.prdp.beta:g}, "
                     f"clip eps={c.prdp.clip_eps:g}")
    else:
        lines.append(f"ddpo: clip range {c.ddpo.clip_range:g}, {c.ddpo.normalization} "
                     f"normalisation, advantages clipped to +-{c.ddpo.adv_clip_max:g}")
    how = "one-pass gradient" if t.gradient == "one_pass" else "gradient"
    lines.append(f"{how} tiles: {til.trajectories} trajectories x {til.steps_per_tile} steps "
                 f"= {til.trajectories * til.steps_per_tile} transitions, {til.num_tiles} per "
                 f"minibatch")
    return lines


def likely_cause(config: ml_collections.ConfigDict) -> str:
    """The usual suspects of a NaN or Inf, with their current values."""
    beta = (f", prdp.beta={config.prdp.beta:g} too small (the targets are reward differences / "
            f"beta)" if config.method == "prdp" else "")
    return (f"likely cause: train.learning_rate={config.train.learning_rate:g} too high{beta}, "
            f"or a reward giving huge values")


def epoch_metrics(samples: EpochSamples, updates: dict, tracker, seconds: float) -> dict:
    """The metrics row of one epoch: rewards (and their parts), update stats, timings."""
    rewards = samples.rewards
    row = dict(reward_mean=float(rewards.mean()), reward_std=float(rewards.std()),
               **{f"reward/{k}": float(np.mean(v))
                  for k, v in samples.reward_info.items() if np.ndim(v) == 1},
               **updates, sample_time=samples.sample_time, reward_time=samples.reward_time,
               epoch_time=seconds)
    if tracker is not None:
        row.update({f"ddpo/{k}": v for k, v in tracker.stats().items()})
    return row


def save_sample_grid(workdir: str, epoch: int, samples: EpochSamples, config) -> None:
    """samples/epoch_<e>.png: the leading prompts' images with their rewards."""
    if samples.grid_images is None:
        return
    metrics_lib.save_reward_grid(
        os.path.join(workdir, "samples", f"epoch_{epoch:05d}.png"), samples.grid_images,
        samples.prompts, samples.rewards, per_prompt=config.train.images_per_prompt,
        rows=config.log.grid_prompts, columns=config.log.grid_images)


def write_summary(workdir: str, config, before: dict, after: dict, say) -> None:
    """Prints the before/after tables; writes eval/summary.json and the before/after grids."""
    lines = evaluation.table(before, after)
    components = evaluation.component_table(before, after)
    for line in components + lines:
        say(line)
    if jax.process_index() != 0:
        return
    files.atomic_write_json(os.path.join(workdir, "eval", "summary.json"),
                            {"before": before, "after": after, "table": lines,
                             "components": components, "epochs": config.train.epochs,
                             "method": config.method})
    for name in config.eval.sets:
        grid = lambda label: os.path.join(workdir, "eval", f"{label}_{prompt_sets.slug(name)}.png")
        if os.path.exists(grid("before")) and os.path.exists(grid("after")):
            evaluation.side_by_side(grid("before"), grid("after"), grid("before_after"))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, log=print,
                       stop: Optional[preemption.StopSignal] = None) -> dict:
    """Trains (resuming from workdir's latest checkpoint if any) and returns the last metrics.

    `stop` records SIGTERM; a caller that installs it before startup (`main`) makes a SIGTERM
    during setup or compilation stop the run cleanly too. Without one, it is installed here, for
    the epochs only.
    """
    began = time.perf_counter()
    config_lib.validate(config)
    is_main = jax.process_index() == 0
    say = log if is_main else (lambda *a, **k: None)
    warning = precision.warning(config)
    if warning:
        say(f"warning: {warning}")
    mesh = sharding.mesh_from_config(config.mesh)
    reward_fn = rewards_lib.combine(dict(config.reward.weights), config)
    train_prompts = prompt_sets.load(config.prompts.train, config)
    pipe = build_pipeline(config, mesh, log=say)
    pipe.check_prompts(train_prompts, f"prompts.train={config.prompts.train}")
    for name in config.eval.sets:
        evaluation.load_eval_set(config, pipe, name)
    setup = make_setup(config, pipe, mesh)
    for line in summary(setup):
        say(line)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    created = not os.path.exists(workdir)
    workdir = prepare_workdir(workdir)
    try:
        return run_in_workdir(setup, workdir, reward_fn, train_prompts, say, stop, began)
    except UserError:
        # A run that fails before its first checkpoint leaves no workdir it created.
        if created and is_main and not any(
                e.isdigit() for e in files.listdir(os.path.join(workdir, "checkpoints"))):
            shutil.rmtree(workdir, ignore_errors=True)
        raise


def run_in_workdir(setup: Setup, workdir: str, reward_fn, train_prompts: list[str], say,
                   stop: Optional[preemption.StopSignal], began: float) -> dict:
    """`train_and_evaluate` after its checks: the workdir exists and the setup is built
    (`began`: the run's start, perf_counter seconds)."""
    config, pipe, mesh = setup.config, setup.pipe, setup.mesh
    is_main = jax.process_index() == 0
    show = bool(config.log.progress) and is_main
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                         config.checkpoint.max_to_keep,
                                         config_lib.fingerprint(config))
    frozen, ref_params = pipe.frozen_params(), pipe.unet_params()
    prompt_sampler = prompt_sets.PromptSampler(train_prompts, config.seed)
    tracker = (ddpo.PerPromptStatTracker(config.ddpo.buffer_size, config.ddpo.min_count)
               if config.method == "ddpo" else None)
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
    start, state, meta = checkpointer.restore_latest(setup.abstract_state(),
                                                     config.checkpoint.fallback, log=say)
    book = Bookkeeping(checkpointer, saved=start)
    if start is None:
        state, start = setup.init_state(pipe.unet_params()), 0
        writer.truncate_after(0)       # rows of a run killed before its first checkpoint
    else:
        prompt_sampler.position = int(meta["prompt_position"])
        if tracker is not None:
            tracker.load_state_dict(meta["stat_tracker"])
        writer.truncate_after(start)
        say(f"resumed from {checkpointer.directory}/{start} (epoch {start} done)")
    if is_main:
        files.atomic_write_json(os.path.join(workdir, "config.json"), config.to_dict())
    t0 = time.perf_counter()
    setup, _ = compile_setup(setup, frozen, log=say)
    compiled = time.perf_counter() - t0
    evaluator = evaluation.Evaluator(config, pipe, mesh, reward_fn) if config.eval.sets else None
    before = after = None  # after: the final evaluation, if the last epoch's periodic one made it
    t0 = time.perf_counter()
    if evaluator is not None:
        before = files.read_json(os.path.join(workdir, "eval", "before.json"), missing_ok=True)
        if before is not None and not evaluation.reusable(before, config):
            say("eval/before.json was made under other evaluation settings (reward, sets, "
                "model or sampling); evaluating the reference again")
            before = None
        if before is None:
            say("evaluating the reference (before finetuning)")
            before = evaluator.run_sets(ref_params, None, frozen, "before", workdir, show)
        for line in evaluation.table(before):
            say(line)
    say(f"ready after {time.perf_counter() - began:.1f}s: steps compiled in {compiled:.1f}s, "
        f"reference evaluated in {time.perf_counter() - t0:.1f}s")

    last = {}
    own_stop = stop is None
    stop = preemption.StopSignal() if own_stop else stop
    checkpoint_meta = lambda: {
        "prompt_position": prompt_sampler.position,
        "stat_tracker": tracker.state_dict() if tracker is not None else None}
    epoch, stopped = start, False
    try:
        for epoch in progress(range(start, config.train.epochs), desc="epochs", initial=start,
                              total=config.train.epochs, enabled=show):
            meta = checkpoint_meta()  # matches `state` (epoch done) until the updates start
            if stop.requested():
                stopped = True
                break
            t0 = time.perf_counter()
            prompts = prompt_sampler.sample(config.train.prompts_per_epoch)
            try:
                result = train_epoch(
                    setup, state, frozen, ref_params, prompts, epoch, reward_fn, tracker, show,
                    stop_sampling=stop.requested,
                    stop_updates=stop.requested if book.may_abandon_updates(epoch) else None)
            except NonFiniteError as e:
                raise NonFiniteError(f"{e}; {likely_cause(config)}; {book.kept()}") from None
            if result is None:
                stopped = True
                break
            state, samples, updates = result
            done = epoch + 1
            last = epoch_metrics(samples, updates, tracker, time.perf_counter() - t0)
            every = config.eval.every_epochs
            if evaluator is not None and every and done % every == 0:
                final = done == config.train.epochs
                after = evaluator.run_sets(state.params, ref_params, frozen,
                                           "after" if final else f"epoch_{done:05d}", workdir,
                                           show, grids=final)
                last.update(evaluation.flatten(after))
            say(f"epoch {done}/{config.train.epochs} | reward {last['reward_mean']:.4f} "
                f"+- {last['reward_std']:.4f} | loss {last['loss']:.4g} "
                f"| clip {last['clip_frac']:.3f} | drift {last['drift']:.3g} "
                f"| {last['epoch_time']:.1f}s")
            # The checkpoint first: a metrics row never outlives a failed save of its epoch.
            if done % config.checkpoint.every_epochs == 0 or done == config.train.epochs:
                book.save(done, state, checkpoint_meta())
            writer.write(done, last)
            if done % config.log.grid_every_epochs == 0 or epoch == 0:
                save_sample_grid(workdir, done, samples, config)
        if stopped:
            book.save_stopped(epoch, state, meta)
    finally:
        if own_stop:
            stop.close()
        checkpointer.close()
        writer.close()
    if stopped:
        raise book.preempted(epoch)
    result = {"metrics": last, "state": state, "setup": setup}
    if evaluator is not None:
        if after is None:
            say("evaluating the finetuned model")
            after = evaluator.run_sets(state.params, ref_params, frozen, "after", workdir, show)
        write_summary(workdir, config, before, after, say)
        result.update(before=before, after=after)
    return result
