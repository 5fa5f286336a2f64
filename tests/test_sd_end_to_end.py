"""Tiny Stable Diffusion end to end: a random SD 1.x-layout folder saved by diffusers, one PRDP epoch
through configs/sd.py's recipe (latent sampler, VAE decode, reward, update, checkpoint) with bf16
weights and activations, then the export command and diffusers reading the result back."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import sd_tiny
from conftest import CACHE, override
from prdp_jax import export as export_lib
from prdp_jax.infra import sharding
from prdp_jax.models import diffusers_folder
from prdp_jax.training import loop
from test_train import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_sd_config(path):
    c = load_config("sd", "small_hpsv2")
    # jpeg_compressibility until the reward helper's branch lands; then the lead switches this to a
    # tiny reward model saved in its published format.
    c.reward.weights = {"jpeg_compressibility": 1.0}
    return override(c, **{
        "model.path": path, "model.param_dtype": "bfloat16",   # recipe: bf16 activations, remat
        "train.epochs": 1, "train.prompts_per_epoch": 2, "train.images_per_prompt": 2,
        "train.passes_per_epoch": 1, "train.prompts_per_minibatch": 1,
        "train.microbatch_trajectories": 2, "train.microbatch_steps": 2,
        "train.learning_rate": 1e-3,   # large enough to move bf16 weights in one epoch
        "sample.num_steps": 2, "sample.batch_size": 4, "eval.sets": (), "mesh.devices": 1,
        "log.progress": False, "log.compile_cache": CACHE, "log.grid_every_epochs": 1})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    folder = sd_tiny.make_folder(str(root / "sd"), "sd1", "safetensors", seed=3)
    workdir = str(root / "run")
    logs = []
    result = loop.train_and_evaluate(tiny_sd_config(folder), workdir, log=logs.append)
    return dict(folder=folder, workdir=workdir, result=result, logs=logs, root=root)


@pytest.mark.slow
def test_one_prdp_epoch_on_tiny_sd(run):
    result, workdir = run["result"], run["workdir"]
    assert any("Stable Diffusion from" in line for line in run["logs"])
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["epoch"] for r in rows] == [1] and np.isfinite(rows[0]["loss"])
    assert rows[0]["reward_mean"] < 0          # minus JPEG kB of decoded 16x16 images
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "1"))
    assert os.path.exists(os.path.join(workdir, "samples", "epoch_00001.png"))
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["schedule"]["steps_offset"] == 1 and saved["schedule"]["beta_start"] == 0.00085

    # Precision: bf16 weights, float32 AdamW moments; the sampler's log-probs and latents float32.
    state, setup = result["state"], result["setup"]
    assert {a.dtype for a in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.bfloat16)}
    assert {a.dtype for a in jax.tree.leaves(state.opt_state) if a.ndim} == {jnp.dtype(jnp.float32)}
    pipe = setup.pipe
    frozen = pipe.frozen_params()
    assert {a.dtype for a in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}
    steps, sh = setup.steps, setup.shardings
    prompt_context = steps.encode(frozen, pipe.tokenizer(["a painting of a cat", "a photo of a dog"]))
    uncond = steps.encode(frozen, pipe.tokenizer([""]))
    key = sharding.put(np.asarray(jax.random.key_data(jax.random.key(0))), sh.replicated)
    traj, images = steps.sample(state.params, frozen, prompt_context, uncond, key,
                                sharding.put(np.arange(4, dtype=np.int32), sh.batch))
    assert traj.log_probs.dtype == jnp.float32 and traj.log_probs.shape == (4, 2)
    assert traj.latents.dtype == jnp.float32 and traj.latents.shape == (4, 3, 8, 8, 4)
    assert images.shape == (4, 16, 16, 3) and images.dtype == jnp.float32
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0


@pytest.mark.slow
def test_export_round_trips_through_diffusers(run, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    out = str(tmp_path / "exported")
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "prdp_jax.export", "--workdir", run["workdir"],
                           "--out", out, "--full"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(out)) == sorted(os.listdir(run["folder"]))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".exported")]  # no temp dir left

    params, epoch, unet, _ = export_lib.restore_unet_params(run["workdir"])
    assert epoch == 1
    source = diffusers_folder.open_folder(run["folder"]).load_unet()
    moved = max(float(np.abs(np.float32(a) - b).max())
                for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(source)))
    assert moved > 1e-3   # the finetuned UNet, not the source one

    ref = UNet2DConditionModel.from_pretrained(os.path.join(out, "unet")).eval()
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    ctx = rng.normal(size=(2, 77, 16)).astype(np.float32)
    t = np.array([21, 961])
    f32 = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    got = jax.jit(unet.apply)({"params": f32}, x, t, ctx)
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                   torch.from_numpy(ctx)).sample.permute(0, 2, 3, 1).numpy()
    err = sd_tiny.rel_err(got, want)
    print(f"exported unet vs diffusers: max abs err / scale = {err:.2e}")
    assert err <= 1e-4
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    for k, v in pipe.unet.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), ref.state_dict()[k].numpy())

    again = subprocess.run([sys.executable, "-m", "prdp_jax.export", "--workdir", run["workdir"],
                            "--out", out], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 2 and again.stderr.strip().startswith("error: ")
    assert "already exists" in again.stderr


def test_cli_refuses_a_bad_model_path_in_one_line(tmp_path):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "prdp_jax.main", "--config", "configs/sd.py:small_hpsv2",
         f"--config.model.path={tmp_path}", '--config.reward.weights={"jpeg_compressibility": 1.0}',
         "--workdir", str(tmp_path / "run")], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "no model_index.json" in lines[0]
