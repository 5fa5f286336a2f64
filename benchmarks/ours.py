"""Our side: the trainer's own compiled steps (`training.epoch`), timed on random weights.

Sampling is the trainer's sampler step (the `lax.scan` chain with CFG, recording log-probs);
an update is one optimiser step of the trainer on one minibatch: scoring its transitions under
the current params (forward only), the PRDP loss and its per-transition weights, the gradient tile
by tile, and AdamW (`train.gradient="tiled"`), or the loss and gradient in one pass ("one_pass"). The per-epoch scoring under theta_old and the reference is not part of it.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.cases import Case
from prdp_jax import config as config_lib
from prdp_jax.infra import sharding
from prdp_jax.pipelines import base as pipeline_lib
from prdp_jax.training import epoch as epoch_lib


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` runs after one warm-up run."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def make_config(case: Case, num_steps: int, minibatch: int, images: int, tile: tuple,
                sample_batch: int, gradient: str = "tiled"):
    """A one-minibatch epoch of `minibatch` trajectories (`images` per prompt) on one device."""
    c = config_lib.base_config()
    c.model.unet.update(case.unet)
    c.model.text_encoder.update(dict(hidden_size=case.text_dim,
                                     max_position_embeddings=case.text_length))
    c.sample.num_steps = num_steps
    c.sample.guidance_scale = case.guidance
    c.sample.batch_size = sample_batch
    t = c.train
    t.images_per_prompt = images
    t.prompts_per_epoch = t.prompts_per_minibatch = minibatch // images
    t.passes_per_epoch = 1
    t.microbatch_trajectories, t.microbatch_steps = min(tile[0], minibatch), tile[1]
    t.gradient = gradient
    c.prdp.beta, c.prdp.clip_eps = 1e-3, 1e-2
    c.log.compile_cache = ""
    return c  # the mesh: every device of this process (see runtime.configure_cpu_devices)


@dataclasses.dataclass
class _Text:
    hidden_size: int


@dataclasses.dataclass
class _Tokenizer:
    max_length: int


class Setup:
    """The trainer's steps (`training.epoch.Setup`) over a freshly initialised UNet of `case`
    (or over `params`, shaped like it), plus fixed prompt contexts."""

    def __init__(self, case: Case, config, seed: int = 0, params=None):
        self.case, self.config = case, config
        mesh = sharding.mesh_from_config(config.mesh)
        self.unet = pipeline_lib.unet_from_config(config)
        latent = case.latent_shape
        init = lambda k: self.unet.init(k, jnp.zeros((1,) + latent), jnp.zeros((1,), jnp.int32),
                                        jnp.zeros((1, case.text_length, case.text_dim)))["params"]
        repl = sharding.replicated(mesh)
        abstract = jax.eval_shape(init, jax.random.key(seed))
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl),
                                abstract)
        self.params = (jax.jit(init, out_shardings=repl)(jax.random.key(seed)) if params is None
                       else params)
        pipe = pipeline_lib.Pipeline(
            unet=self.unet, text_encoder=_Text(case.text_dim),
            tokenizer=_Tokenizer(case.text_length), latent_shape=latent,
            decode=pipeline_lib.pixel_decode, unet_params=None, frozen_params=None,
            abstract_unet_params=abstract, score_dtype=pipeline_lib.score_dtype_of(config))
        self.training = epoch_lib.make_setup(config, pipe, mesh)
        rng = np.random.default_rng(seed)
        t = self.training
        repl = t.shardings.replicated
        self.context = sharding.put(
            rng.normal(size=(t.shape.prompts, case.text_length, case.text_dim)).astype(np.float32),
            repl)
        self.uncond = sharding.put(
            rng.normal(size=(1, case.text_length, case.text_dim)).astype(np.float32), repl)
        self.key = sharding.put(np.asarray(jax.random.key_data(jax.random.key(seed))), repl)

    def compile(self) -> dict:
        """Compile stats of each step, compiled one after another (clean per-step seconds)."""
        self.training, stats = epoch_lib.compile_setup(self.training, {}, log=lambda *a: None,
                                                       parallel=False)
        return stats

    def sample(self, start: int = 0):
        """One sampler call: trajectories start .. start + sample batch."""
        t = self.training
        index = np.arange(start, start + t.shape.sample_batch, dtype=np.int32)
        return t.steps.sample(self.params, {}, self.context, self.uncond, self.key,
                              sharding.put(index, t.shardings.batch))

    def epoch_data(self):
        """The epoch's minibatches, sampled from the params and scored as the trainer does
        (`score_transitions`' info kept in `self.score_info`)."""
        t = self.training
        size, total = t.shape.sample_batch, t.shape.trajectories
        batches = tuple(self.sample(i * size)[0] for i in range(total // size))
        rewards = np.random.default_rng(1).normal(size=total).astype(np.float32) * 0.01
        samples = epoch_lib.EpochSamples(
            prompts=[], batches=batches, prompt_context=self.context, uncond=self.uncond,
            rewards=rewards, reward_info={}, grid_images=None, sample_time=0.0, reward_time=0.0)
        data, self.score_info = epoch_lib.score_transitions(t, self.params, self.params, samples,
                                                            np.zeros_like(rewards), 0)
        return data

    def update_fn(self):
        """() -> one optimiser step (params and AdamW state carried from call to call)."""
        t = self.training
        state = t.init_state(jax.tree.map(jnp.copy, self.params))
        data = self.epoch_data()
        carry = {"params": state.params, "opt": state.opt_state}

        def step():
            loss, grads, _ = epoch_lib.minibatch_gradient(t, carry["params"], data, self.uncond, 0)
            carry["params"], carry["opt"], norm, _ = t.steps.apply(carry["params"], carry["opt"],
                                                                   grads, loss)
            return norm

        return step


def host_params(params) -> Any:
    return jax.tree.map(np.asarray, params)


def unet_flops(setup: Setup, batch: int, repeats: int) -> dict:
    """FLOPs of one UNet forward (XLA's cost analysis of the whole program) and the median
    time of the compiled program, data-parallel over this process's devices."""
    case = setup.case
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch,) + case.latent_shape).astype(np.float32))
    t = jnp.asarray(rng.integers(0, 1000, batch).astype(np.int32))
    ctx = jnp.asarray(rng.normal(size=(batch, case.text_length, case.text_dim)).astype(np.float32))
    batch = setup.training.shardings.batch
    x, t, ctx = (sharding.put(np.asarray(a), batch) for a in (x, t, ctx))
    fwd = jax.jit(lambda p, x, t, c: setup.unet.apply({"params": p}, x, t, c),
                  out_shardings=batch)
    lowered = fwd.lower(setup.params, x, t, ctx)
    cost = lowered.cost_analysis()  # of the whole (unpartitioned) program
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    compiled = lowered.compile()
    seconds = median_seconds(lambda: compiled(setup.params, x, t, ctx), repeats)
    return {"flops": float(cost["flops"]), "seconds": seconds,
            "flop_per_s": float(cost["flops"]) / seconds, "devices": jax.device_count()}


def matmul_peak(repeats: int, n: int = 2048) -> dict:
    """float32 matmul throughput of this device: an [n, n] x [n, n] product, 2 n^3 FLOPs."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(n, n)).astype(np.float32))
    b = jnp.asarray(rng.normal(size=(n, n)).astype(np.float32))
    f = jax.jit(jnp.matmul)
    seconds = median_seconds(lambda: f(a, b), max(repeats, 3))
    return {"n": n, "seconds": seconds, "flop_per_s": 2 * n ** 3 / seconds}


def read_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def update_memory(setup: Setup, stats: dict) -> dict:
    """Peak resident memory of one optimiser step of a compiled Setup (`stats`: its compile
    stats), beyond what was resident before it: the stored trajectories are already there."""
    case, num_steps = setup.case, setup.training.num_steps
    minibatch = setup.training.shape.minibatch_trajectories
    step = setup.update_fn()
    before = read_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak RSS, to the current RSS
    jax.block_until_ready(step())
    peak = read_status_kib("VmHWM")
    trajectories = minibatch * ((num_steps + 1) * math.prod(case.latent_shape) + 2 * num_steps) * 4
    return {"peak_rss_bytes": peak * 1024, "rss_before_bytes": before * 1024,
            "update_bytes": (peak - before) * 1024, "stored_trajectory_bytes": trajectories,
            "xla_temp_bytes": max(stats[k]["temp_bytes"] for k in ("score", "grad_tile"))}
