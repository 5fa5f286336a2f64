"""The diffusers folder reader on bad input (one clear WeightsError naming file, key and shapes),
weight formats (fp16 variant, bf16 safetensors, .bin without torch), and the SD pipeline's sharded
weights and decode on an 8-device mesh."""
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

import sd_tiny
from conftest import tiny_config, override
from prdp_jax.infra import sharding
from prdp_jax.infra.errors import ConfigError, WeightsError
from prdp_jax.models import diffusers_folder
from prdp_jax.pipelines.factory import build_pipeline


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return sd_tiny.make_folder(str(tmp_path_factory.mktemp("sd") / "sd1"), "sd1", "safetensors", seed=7)


@pytest.fixture
def folder(pristine, tmp_path):
    path = str(tmp_path / "copy")
    shutil.copytree(pristine, path)
    return path


def edit_json(path, **changes):
    data = json.load(open(path))
    data.update(changes)
    json.dump(data, open(path, "w"))


def load_all(path, variant=""):
    f = diffusers_folder.open_folder(path, variant=variant)
    return f.load_unet(), f.load_vae(), f.load_text_encoder()


@pytest.mark.slow
def test_bad_layouts_are_refused(folder, tmp_path):
    with pytest.raises(WeightsError, match="not a directory"):
        diffusers_folder.open_folder(str(tmp_path / "nope"))
    with pytest.raises(WeightsError, match="no model_index.json.*one component's folder; use its parent"):
        diffusers_folder.open_folder(os.path.join(folder, "unet"))
    index = os.path.join(folder, "model_index.json")
    edit_json(index, text_encoder_2=["transformers", "CLIPTextModelWithProjection"])
    with pytest.raises(WeightsError, match="not Stable Diffusion 1.x/2.x"):
        diffusers_folder.open_folder(folder)
    edit_json(index, text_encoder_2=None, vae=["diffusers", "AutoencoderTiny"])
    data = json.load(open(index))
    del data["text_encoder_2"]
    json.dump(data, open(index, "w"))
    with pytest.raises(WeightsError, match="component 'vae' must be AutoencoderKL"):
        diffusers_folder.open_folder(folder)
    edit_json(index, vae=["diffusers", "AutoencoderKL"])
    shutil.rmtree(os.path.join(folder, "vae"))
    with pytest.raises(WeightsError, match=r"vae: missing component folder"):
        diffusers_folder.open_folder(folder)


@pytest.mark.slow
def test_missing_and_corrupt_weights_are_refused(folder):
    unet_file = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    with open(unet_file, "r+b") as f:
        f.truncate(os.path.getsize(unet_file) // 2)
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model\.safetensors: tensor .* outside the file"):
        diffusers_folder.open_folder(folder).load_unet()
    os.remove(unet_file)
    with pytest.raises(WeightsError, match=r"unet: no weights file \(looked for diffusion_pytorch_model.safetensors"):
        diffusers_folder.open_folder(folder).load_unet()
    with pytest.raises(WeightsError, match="config.json: file not found"):
        os.remove(os.path.join(folder, "text_encoder", "config.json"))
        diffusers_folder.open_folder(folder)


@pytest.mark.slow
def test_config_and_weights_that_disagree_name_key_and_shapes(folder):
    edit_json(os.path.join(folder, "unet", "config.json"), block_out_channels=[24, 32])
    with pytest.raises(WeightsError, match=r"unet[/\\]diffusion_pytorch_model\.safetensors: key "
                                           r"'conv_in\.bias' has shape \(16,\), the config "
                                           r"expects \(24,\)"):
        diffusers_folder.open_folder(folder).load_unet()
    edit_json(os.path.join(folder, "text_encoder", "config.json"), num_hidden_layers=1)
    with pytest.raises(WeightsError, match=r"model\.safetensors: unexpected key "
                                           r"'(text_model\.)?encoder\.layers\.1\..*config and weights disagree"):
        diffusers_folder.open_folder(folder).load_text_encoder()
    edit_json(os.path.join(folder, "unet", "config.json"), block_out_channels=[16, 32],
              addition_embed_type="text_time")
    with pytest.raises(WeightsError, match=r"addition_embed_type='text_time' is not supported"):
        diffusers_folder.open_folder(folder)


@pytest.mark.slow
def test_fp16_variant_bf16_tensors_and_bin_without_torch(folder, pristine, monkeypatch):
    import torch
    from safetensors.torch import load_file, save_file
    want = load_all(pristine)
    # Only the fp16 variant present: read, values equal the fp16-rounded originals.
    for comp, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        src = os.path.join(folder, comp, f"{name}.safetensors")
        save_file({k: v.half() for k, v in load_file(src).items()},
                  os.path.join(folder, comp, f"{name}.fp16.safetensors"))
        os.remove(src)
    got = load_all(folder)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, np.float32(np.float16(b)))
    with pytest.raises(WeightsError, match="no weights file"):
        diffusers_folder.read_state_dict(os.path.join(pristine, "unet"), "unet", "fp16")
    # bf16 tensors (safetensors.numpy cannot hold them; our reader can).
    path = os.path.join(folder, "bf16.safetensors")
    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.arange(4, dtype=torch.int64)}
    save_file(tensors, path)
    read = diffusers_folder.read_safetensors(path)
    np.testing.assert_array_equal(read["a"].astype(np.float32), tensors["a"].float().numpy())
    np.testing.assert_array_equal(read["b"], tensors["b"].numpy())
    # A .bin checkpoint needs torch; without it the error says so.
    torch.save(load_file(os.path.join(pristine, "vae", "diffusion_pytorch_model.safetensors")),
               os.path.join(folder, "vae", "diffusion_pytorch_model.bin"))
    os.remove(os.path.join(folder, "vae", "diffusion_pytorch_model.fp16.safetensors"))
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model\.bin is a PyTorch \.bin file "
                                           r"and reading it needs torch"):
        diffusers_folder.open_folder(folder).load_vae()
    # ... while safetensors weights need no torch at all.
    unet = diffusers_folder.open_folder(pristine).load_unet()
    for a, b in zip(jax.tree.leaves(unet), jax.tree.leaves(want[0])):
        np.testing.assert_array_equal(a, b)


def sd_config(path, **overrides):
    c = tiny_config()
    c.model.source = "diffusers"
    c.model.path = path
    return override(c, **overrides)


@pytest.mark.slow
def test_pipeline_weights_and_decode_are_sharded(pristine):
    config = sd_config(pristine, **{"mesh.devices": 8, "mesh.data": 2, "mesh.fsdp": 4,
                                    "mesh.fsdp_min_size": 256})
    mesh = sharding.mesh_from_config(config.mesh)
    pipe = build_pipeline(config, mesh, log=lambda *a: None)
    assert pipe.latent_shape == (8, 8, 4) and pipe.tokenizer.max_length == 77
    assert config.schedule.steps_offset == 1   # from scheduler/scheduler_config.json
    params, frozen = pipe.unet_params(), pipe.frozen_params()
    specs = {str(a.sharding.spec) for a in jax.tree.leaves(params)}
    assert any("fsdp" in s for s in specs)
    latents = np.random.default_rng(0).normal(size=(8, 8, 8, 4)).astype(np.float32)
    sharded = jax.jit(pipe.decode, out_shardings=sharding.batch_sharding(mesh))(
        frozen, sharding.put(latents, sharding.batch_sharding(mesh)))
    plain = pipe.decode(jax.device_get(frozen), latents)
    assert sharded.shape == (8, 16, 16, 3)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(plain), atol=1e-5)
    with pytest.raises(ConfigError, match="model.resolution=18 must be a multiple of 4"):
        build_pipeline(sd_config(pristine, **{"model.resolution": 18}), mesh)
    with pytest.raises(ConfigError, match="needs model.path"):
        build_pipeline(sd_config(""), mesh)
