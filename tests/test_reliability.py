"""Nothing poisoned is saved, nothing corrupt is loaded: the NaN guard, checkpoint checksums,
strict metrics, and every case of `reliability.py` through the real command line."""
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prdp_jax import config as config_lib
from prdp_jax.infra import metrics as metrics_lib
from prdp_jax.training import checkpoint as ckpt_lib
from prdp_jax.training.steps import NONFINITE, apply_gradients

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reliability  # noqa: E402


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else [])
    for c in reliability.CASES])
def test_case(case, tmp_path):
    reliability.verify(case, reliability.run(case, str(tmp_path / "run")))


@pytest.mark.parametrize("field, value, message", [
    ("train.learning_rate", float("nan"), "train.learning_rate must be a finite number >= 0"),
    ("train.learning_rate", float("inf"), "train.learning_rate must be a finite number >= 0"),
    ("train.learning_rate", -1e-4, "train.learning_rate must be a finite number >= 0"),
    ("prdp.beta", float("nan"), "prdp.beta must be a finite number > 0"),
    ("prdp.beta", 0.0, "prdp.beta must be a finite number > 0"),
    ("train.max_grad_norm", float("inf"), "train.max_grad_norm must be a finite number > 0"),
    ("train.weight_decay", float("nan"), "train.weight_decay must be a finite number >= 0"),
    ("reward.weights", {"jpeg_compressibility": float("inf")},
     "reward.weights.jpeg_compressibility must be a finite number"),
    ("checkpoint.max_to_keep", 0, "checkpoint.max_to_keep must be >= 1"),
    ("checkpoint.fallback", "latest", "checkpoint.fallback must be one of"),
    ("sample.guidance_scale", -1.0, "sample.guidance_scale must be a finite number >= 0"),
    ("eval.drift_prompts", -1, "eval.drift_prompts must be >= 0"),
])
def test_bad_values_are_refused_at_start(field, value, message):
    from conftest import tiny_config
    from prdp_jax import config as config_lib
    from prdp_jax.infra.errors import ConfigError
    config = tiny_config()
    if field == "reward.weights":
        config.reward.weights = value
    else:
        config_lib.set_field(config, field, value)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        config_lib.validate(config)
    config_lib.validate(tiny_config())   # and the defaults pass


def test_prompts_with_no_known_word_and_long_prompts(tmp_path):
    """A prompt that tokenizes to nothing is refused up front; a 100 KB one is shortened in the
    error line."""
    from conftest import tiny_config
    from prdp_jax.infra import sharding
    from prdp_jax.infra.errors import PromptError
    from prdp_jax.pipelines.factory import build_pipeline
    config = tiny_config()
    pipe = build_pipeline(config, sharding.mesh_from_config(config.mesh), log=lambda *a: None)
    with pytest.raises(PromptError, match="prompt 2: .*no word the tokenizer knows"):
        pipe.check_prompts(["cat", "\U0001F431"], "prompts.train=file:x")
    with pytest.raises(PromptError) as e:
        pipe.check_prompts(["cat", "cat " * 25_000], "prompts.train=file:x")
    assert "prompt 2" in str(e.value) and len(str(e.value)) < 300


def _params():
    return {"a": jnp.arange(6.0).reshape(2, 3), "b": {"c": jnp.ones((4,))}}


@pytest.mark.parametrize("bad, status", [("loss", 1), ("grad", 2), ("params", 3)])
def test_apply_refuses_non_finite_steps(bad, status):
    """A NaN loss or gradient, or an update that overflows a parameter, leaves params and the
    AdamW state exactly as they were, and says which."""
    optimizer = optax.adamw(1.0 if bad != "params" else 3e38, b1=0.0)
    params = _params()
    if bad == "params":
        params = jax.tree.map(lambda x: x + 3e38, params)
    opt_state = optimizer.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    if bad == "grad":
        grads["b"]["c"] = grads["b"]["c"].at[1].set(jnp.nan)
    loss = jnp.float32(jnp.nan if bad == "loss" else 1.0)
    new, new_opt, _, got = apply_gradients(optimizer, "", params, opt_state, grads, loss)
    assert int(got) == status and NONFINITE[status]
    for x, y in zip(jax.tree.leaves((new, new_opt)), jax.tree.leaves((params, opt_state))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_apply_applies_finite_steps():
    """A finite step is optax's own AdamW step, bit for bit."""
    optimizer = optax.adamw(1e-2)
    params = _params()
    opt_state = optimizer.init(params)
    grads = jax.tree.map(lambda x: jnp.sin(x) + 0.5, params)
    new, _, norm, status = apply_gradients(optimizer, "", params, opt_state, grads, jnp.float32(2.0))
    updates, _ = optimizer.update(grads, opt_state, params)
    expected = optax.apply_updates(params, updates)
    assert int(status) == 0
    np.testing.assert_allclose(float(norm), float(optax.tree.norm(grads)), rtol=1e-6)
    for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_apply_guards_the_trainable_params():
    """With train.trainable, a NaN gradient of a finetuned param is refused, and the frozen
    params come back untouched either way."""
    from prdp_jax.training import state as state_lib
    config = config_lib.base_config()
    config.train.trainable = "a"
    optimizer = state_lib.make_optimizer(config)
    params = _params()
    opt_state = optimizer.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    new, _, norm, status = apply_gradients(optimizer, "a", params, opt_state, grads, jnp.float32(1.0))
    assert int(status) == 0 and float(norm) == pytest.approx(6 ** 0.5)  # only "a" counts
    assert float(jnp.abs(new["a"] - params["a"]).max()) > 0
    np.testing.assert_array_equal(np.asarray(new["b"]["c"]), np.asarray(params["b"]["c"]))
    grads["a"] = grads["a"].at[0, 0].set(jnp.nan)
    new, _, _, status = apply_gradients(optimizer, "a", params, opt_state, grads, jnp.float32(1.0))
    assert int(status) == 2
    np.testing.assert_array_equal(np.asarray(new["a"]), np.asarray(params["a"]))


def test_checksums_see_every_bit_and_ignore_sharding():
    from jax.sharding import NamedSharding, PartitionSpec as P
    x = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    base = ckpt_lib.checksums({"x": jnp.asarray(x)})
    flipped = x.copy()
    flipped.view(np.uint32)[3, 5] ^= 1          # one bit of one value
    assert ckpt_lib.checksums({"x": jnp.asarray(flipped)}) != base
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]           # the same values in another order
    assert ckpt_lib.checksums({"x": jnp.asarray(swapped)}) != base
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("d",))
    sharded = jax.device_put(x, NamedSharding(mesh, P("d")))
    assert ckpt_lib.checksums({"x": sharded}) == base


def test_checkpoint_verifies_on_restore(tmp_path):
    """A changed byte in a saved array is refused with the previous checkpoint suggested; with
    fallback='previous' the latest good one is restored and the corrupt one moved aside."""
    from prdp_jax.infra.errors import CheckpointError
    state = {"w": jnp.arange(4096.0), "k": jnp.array([1, 2], jnp.uint32)}
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                            state)
    directory = str(tmp_path / "checkpoints")
    ckpt = ckpt_lib.Checkpointer(directory, 3, {"m": 1})
    ckpt.save(1, state, {})
    ckpt.save(2, jax.tree.map(lambda a: a + 1, state), {})
    reliability.corrupt_latest(str(tmp_path))
    with pytest.raises(CheckpointError, match="corrupted.*checkpoint 1 is the previous one"):
        ckpt.restore(2, abstract)
    said = []
    epoch, restored, _ = ckpt.restore_latest(abstract, "previous", log=said.append)
    assert epoch == 1 and "falling back to checkpoint 1" in said[0]
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(4096.0))
    assert os.path.isdir(str(tmp_path / "checkpoints_corrupt" / "2"))
    ckpt.close()


def test_metrics_stay_strict_json(tmp_path):
    writer = metrics_lib.MetricWriter(str(tmp_path), enabled=True)
    writer.write(1, {"loss": float("nan"), "reward_mean": -math.inf, "ok": 0.5})
    writer.close()
    line = open(tmp_path / "metrics.jsonl").read()
    row = json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
    assert row["loss"] is None and row["reward_mean"] is None and row["ok"] == 0.5
    assert row["nonfinite"] == ["loss", "reward_mean"]


def test_truncate_rewrites_metrics_and_events(tmp_path):
    """A restart to epoch 1 keeps one row and one event per epoch, in JSONL and TensorBoard."""
    writer = metrics_lib.MetricWriter(str(tmp_path), enabled=True)
    for epoch in (1, 2, 3):
        writer.write(epoch, {"loss": float(epoch)})
    writer.close()
    writer = metrics_lib.MetricWriter(str(tmp_path), enabled=True)   # the restarted run
    writer.truncate_after(1)
    writer.write(2, {"loss": 20.0})
    writer.close()
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [(r["epoch"], r["loss"]) for r in rows] == [(1, 1.0), (2, 20.0)]
    events = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    steps = [s for e in events for s in reliability.event_steps(str(e), "loss")]
    assert sorted(steps) == [1, 2]
