"""The published SD 1.5 and SD 2.1 component configs (as in their diffusers folders) build modules
whose parameters are exactly the published checkpoints' keys and shapes: our param trees (abstract,
no memory) against diffusers / transformers models built on torch's meta device from the same
configs. No weights are needed."""
import jax
import numpy as np
import pytest
import torch

from prdp_jax.models import diffusers_folder
from prdp_jax.models.convert import _torch_shape, flax_path_to_torch_key
from prdp_jax.models.text_encoder import TextEncoder
from prdp_jax.models.unet import UNet
from prdp_jax.models.vae import AutoencoderKL
from prdp_jax.pipelines import sd

DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
COMMON_UNET = {"_class_name": "UNet2DConditionModel", "act_fn": "silu",
               "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
               "down_block_types": DOWN, "downsample_padding": 1, "flip_sin_to_cos": True,
               "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
               "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
               "out_channels": 4, "up_block_types": UP}
UNETS = {
    "sd15": dict(COMMON_UNET, attention_head_dim=8, cross_attention_dim=768, sample_size=64),
    "sd21": dict(COMMON_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                 sample_size=96, use_linear_projection=True, upcast_attention=True,
                 dual_cross_attention=False, num_class_embeds=None, only_cross_attention=False),
}
TEXT = {
    "sd15": dict(architectures=["CLIPTextModel"], hidden_size=768, intermediate_size=3072,
                 num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=77,
                 vocab_size=49408, hidden_act="quick_gelu", projection_dim=768, eos_token_id=2,
                 bos_token_id=0, pad_token_id=1),
    "sd21": dict(architectures=["CLIPTextModel"], hidden_size=1024, intermediate_size=4096,
                 num_attention_heads=16, num_hidden_layers=23, max_position_embeddings=77,
                 vocab_size=49408, hidden_act="gelu", projection_dim=512, eos_token_id=2,
                 bos_token_id=0, pad_token_id=1),
}
VAE = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
       "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
       "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
       "up_block_types": ["UpDecoderBlock2D"] * 4}


def flax_layout(abstract) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
    out = {}
    for path, leaf in flat:
        names = tuple(k.key for k in path)
        out[flax_path_to_torch_key(names)] = _torch_shape(names[-1], tuple(leaf.shape))
    return out


def torch_layout(module, prefix="") -> dict:
    return {k[len(prefix):]: tuple(v.shape) for k, v in module.state_dict().items()
            if not k.endswith("position_ids")}


def abstract_of(module, *args):
    return jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a)["params"], *args)


@pytest.mark.parametrize("version", sorted(UNETS))
def test_published_configs_give_the_published_parameter_layout(version):
    from diffusers import AutoencoderKL as TorchVAE, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    fields = diffusers_folder.unet_fields(UNETS[version])
    assert fields["num_attention_heads"] == (8 if version == "sd15" else (5, 10, 20, 20))
    unet = UNet(**fields)
    ours = flax_layout(abstract_of(unet, jax.ShapeDtypeStruct((1, 8, 8, 4), np.float32),
                                   jax.ShapeDtypeStruct((1,), np.int32),
                                   jax.ShapeDtypeStruct((1, 77, unet.cross_attention_dim), np.float32)))
    cfg = {k: v for k, v in UNETS[version].items() if not k.startswith("_")}
    with torch.device("meta"):
        ref_unet = UNet2DConditionModel(**cfg)
        ref_text = CLIPTextModel(CLIPTextConfig(**TEXT[version]))
        ref_vae = TorchVAE(**{k: v for k, v in VAE.items() if not k.startswith("_")})
    assert ours == torch_layout(ref_unet)
    counts = {"unet": sum(int(np.prod(s)) for s in ours.values())}

    text = TextEncoder(**diffusers_folder.text_encoder_fields(TEXT[version]))
    ours = flax_layout(abstract_of(text, jax.ShapeDtypeStruct((1, 77), np.int32)))
    prefix = "text_model." if any(k.startswith("text_model.") for k in ref_text.state_dict()) else ""
    assert {prefix + k: v for k, v in ours.items()} == {prefix + k: v for k, v in
                                                        torch_layout(ref_text, prefix).items()}
    counts["text_encoder"] = sum(int(np.prod(s)) for s in ours.values())

    vae = AutoencoderKL(**diffusers_folder.vae_fields(VAE))
    ours = flax_layout(abstract_of(vae, jax.ShapeDtypeStruct((1, 16, 16, 3), np.float32)))
    assert ours == torch_layout(ref_vae)
    counts["vae"] = sum(int(np.prod(s)) for s in ours.values())
    print(version, {k: f"{v:,}" for k, v in counts.items()})

    folder = diffusers_folder.Folder(path="", unet=unet, vae=vae, text_encoder=text, schedule={})
    assert sd.latent_shape(folder, 0) == ((64, 64, 4) if version == "sd15" else (96, 96, 4))
    assert sd.latent_shape(folder, 512) == (64, 64, 4)
