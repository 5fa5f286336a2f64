"""Stable Diffusion components read from saved diffusers folders against PyTorch diffusers /
transformers on the same weights: UNet (SD1-like from safetensors, SD2-like from .bin), the VAE's
encoder and decoder (current and legacy attention names), and tokenizer + text encoder against the
diffusers pipeline's own prompt encoding (quick_gelu and exact gelu). float32; the bar is a max
abs difference <= 1e-4 of the reference output's scale."""
import os
import shutil

import jax
import numpy as np
import pytest
import torch

import sd_tiny
from prdp_jax.models import diffusers_folder
from prdp_jax.models.tokenizers import CLIPTokenizer
from prdp_jax.models.vae import AutoencoderKL

TOL = 1e-4
FLAVOURS = {"sd1": "safetensors", "sd2": "bin"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return {kind: sd_tiny.make_folder(str(root / kind), kind, weights, seed=i)
            for i, (kind, weights) in enumerate(FLAVOURS.items())}


@pytest.mark.parametrize("kind", sorted(FLAVOURS))
def test_unet_from_folder_matches_diffusers(folders, kind):
    folder = diffusers_folder.open_folder(folders[kind])
    params = folder.load_unet()
    ref, _, _ = sd_tiny.torch_models(folders[kind])
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    ctx = rng.normal(size=(2, 32, 16)).astype(np.float32)
    t = np.array([1, 981])
    got = jax.jit(folder.unet.apply)({"params": params}, x, t, ctx)
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                   torch.from_numpy(ctx)).sample.permute(0, 2, 3, 1).numpy()
    err = sd_tiny.rel_err(got, want)
    print(f"unet {kind} ({FLAVOURS[kind]}): max abs err / scale = {err:.2e}")
    assert err <= TOL
    assert folder.unet.use_linear_projection == (kind == "sd2")
    assert folder.unet.heads() == ((2, 2) if kind == "sd1" else (2, 4))


def _vae_outputs(folder, params, x, z):
    mean, logvar = jax.jit(lambda p, x: folder.vae.apply({"params": p}, x,
                                                         method=AutoencoderKL.encode))(params, x)
    images = jax.jit(lambda p, z: folder.vae.apply({"params": p}, z,
                                                   method=AutoencoderKL.decode_latents))(params, z)
    return mean, logvar, images


def test_vae_encode_decode_match_diffusers_with_both_attention_names(folders, tmp_path):
    path = folders["sd1"]
    folder = diffusers_folder.open_folder(path)
    _, ref, _ = sd_tiny.torch_models(path)
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
    z = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    mean, logvar, images = _vae_outputs(folder, folder.load_vae(), x, z)
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
        dec = ref.decode(torch.from_numpy(z).permute(0, 3, 1, 2) / ref.config.scaling_factor).sample
    want_images = (dec / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    errs = dict(mean=sd_tiny.rel_err(mean, dist.mean.permute(0, 2, 3, 1).numpy()),
                logvar=sd_tiny.rel_err(logvar, dist.logvar.permute(0, 2, 3, 1).numpy()),
                decode=sd_tiny.rel_err(images, want_images))
    print("vae: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    assert max(errs.values()) <= TOL
    assert folder.vae.downscale == 2 and folder.vae.scaling_factor == ref.config.scaling_factor

    # The same weights under the legacy attention names (query/key/value/proj_attn).
    legacy = str(tmp_path / "legacy")
    shutil.copytree(path, legacy)
    vae_file = os.path.join(legacy, "vae", "diffusion_pytorch_model.safetensors")
    state = diffusers_folder.read_safetensors(vae_file)
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in state.items():
        for new, old in names.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        renamed[k] = np.array(v)
    assert any(".proj_attn." in k for k in renamed)
    from safetensors.numpy import save_file
    save_file(renamed, vae_file)
    old_folder = diffusers_folder.open_folder(legacy)
    again = _vae_outputs(old_folder, old_folder.load_vae(), x, z)
    for a, b in zip(again, (mean, logvar, images)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", sorted(FLAVOURS))
def test_prompt_encoding_matches_the_diffusers_pipeline(folders, kind):
    """Tokenizer (padded to the encoder's length) + text encoder = StableDiffusionPipeline.encode_prompt."""
    from diffusers import StableDiffusionPipeline
    path = folders[kind]
    folder = diffusers_folder.open_folder(path)
    assert folder.text_encoder.hidden_act == ("quick_gelu" if kind == "sd1" else "gelu")
    tokenizer = CLIPTokenizer(os.path.join(path, "tokenizer"), folder.text_encoder.max_position_embeddings)
    prompts = ["a painting of a hedgehog", "a photo of a cat", ""]
    ids = tokenizer(prompts)
    assert ids.shape == (3, 77) and ids.dtype == np.int32
    hidden, _ = folder.text_encoder.apply({"params": folder.load_text_encoder()}, ids)
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    with torch.no_grad():
        want, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    err = sd_tiny.rel_err(hidden, want.numpy())
    print(f"text {kind} ({folder.text_encoder.hidden_act}): max abs err / scale = {err:.2e}")
    assert err <= TOL
