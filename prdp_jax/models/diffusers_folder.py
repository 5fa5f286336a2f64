"""A local diffusers pipeline folder (Stable Diffusion 1.x / 2.x) read into our Flax modules.

The folder is what `StableDiffusionPipeline.save_pretrained` writes (and what a hub snapshot holds):

    model_index.json
    unet/config.json            unet/diffusion_pytorch_model[.fp16].{safetensors,bin}
    vae/config.json             vae/diffusion_pytorch_model[.fp16].{safetensors,bin}
    text_encoder/config.json    text_encoder/{model.safetensors,pytorch_model.bin} (or .fp16.)
    tokenizer/                  vocab.json, merges.txt, tokenizer_config.json, ...
    scheduler/scheduler_config.json

Configs are read first and build the modules (no weights needed for that); weights are read only
when `load_*` is called. Safetensors files are memory-mapped with numpy (no torch needed; fp32, fp16
and bf16 tensors); `.bin` files need torch. Every problem raises one `WeightsError` naming the file
(and key and shapes where it applies); nothing partial is returned.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from prdp_jax.infra.errors import ConfigError, WeightsError
from prdp_jax.infra.files import read_json
from prdp_jax.models.convert import rename_legacy_attention, state_dict_to_params, _to_numpy
from prdp_jax.models.text_encoder import TextEncoder
from prdp_jax.models.unet import UNet
from prdp_jax.models.vae import AutoencoderKL

# Classes model_index.json must name for each component we read.
EXPECTED_CLASSES = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast", "WordTokenizer"),
}
# A pixel-space pipeline (the embedded world's base) has no VAE.
PIXEL_SPACE_PIPELINES = ("PRDPWorldPipeline",)
# File name stems of each component's weights: (safetensors stem, bin stem).
WEIGHT_STEMS = {
    "unet": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "vae": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "text_encoder": ("model", "pytorch_model"),
}
VARIANTS = ("", "fp16")

# diffusers UNet2DConditionModel options our UNet does not implement, with the value SD 1.x/2.x
# use. A config that sets anything else (SDXL, inpainting extras, LCM, ...) is refused by name.
_UNET_FIXED = {
    "center_input_sample": False, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False, "downsample_padding": 1, "mid_block_scale_factor": 1,
    "act_fn": "silu", "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "dual_cross_attention": False, "class_embed_type": None,
    "addition_embed_type": None, "num_class_embeds": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None, "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
}
_VAE_FIXED = {"act_fn": "silu", "latents_mean": None, "latents_std": None}
# diffusers' DDIMScheduler defaults, used for keys a scheduler config leaves out.
_SCHEDULE_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                          beta_schedule="linear", set_alpha_to_one=True, steps_offset=0,
                          timestep_spacing="leading", prediction_type="epsilon")


# ---------------------------------------------------------------------------------------------
# Configs.
# ---------------------------------------------------------------------------------------------

def check_layout(root: str) -> dict:
    """Checks that `root` is a diffusers Stable Diffusion folder; returns model_index.json."""
    if not os.path.isdir(root):
        raise WeightsError(f"model.path {root}: not a directory; point it at a diffusers pipeline "
                           f"folder (the one holding model_index.json)")
    index_path = os.path.join(root, "model_index.json")
    if not os.path.isfile(index_path):
        hint = (" (this looks like one component's folder; use its parent)"
                if os.path.isfile(os.path.join(root, "config.json")) else "")
        raise WeightsError(f"model.path {root}: no model_index.json, so not a diffusers pipeline "
                           f"folder{hint}")
    index = read_json(index_path)
    if "text_encoder_2" in index or "unet" not in index:
        raise WeightsError(f"{index_path}: pipeline {index.get('_class_name', '?')} is not Stable "
                           f"Diffusion 1.x/2.x (needs unet, vae, text_encoder, tokenizer, scheduler)")
    pixel_space = index.get("_class_name") in PIXEL_SPACE_PIPELINES
    for name, classes in EXPECTED_CLASSES.items():
        if name == "vae" and pixel_space:
            continue
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1] in classes):
            raise WeightsError(f"{index_path}: component {name!r} must be {' or '.join(classes)}, "
                               f"found {entry!r}")
        if not os.path.isdir(os.path.join(root, name)):
            raise WeightsError(f"{os.path.join(root, name)}: missing component folder")
    return index


def _refuse_unsupported(cfg: dict, fixed: dict, path: str) -> None:
    for key, expected in fixed.items():
        if key in cfg and cfg[key] != expected and not (cfg[key] in (None, False) and
                                                         expected in (None, False)):
            raise WeightsError(f"{path}: {key}={cfg[key]!r} is not supported (Stable Diffusion "
                               f"1.x/2.x use {expected!r})")


def unet_fields(cfg: dict, path: str = "unet/config.json") -> dict:
    """Our UNet's fields from a diffusers `UNet2DConditionModel` config.

    diffusers names the number of heads per block `attention_head_dim` (a historical misnomer it
    keeps for compatibility): SD 1.x says 8 (8 heads of 40, 80, 160 channels), SD 2.x says
    [5, 10, 20, 20] (heads of 64 channels). A config may instead set `num_attention_heads`.
    """
    if cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise WeightsError(f"{path}: _class_name must be UNet2DConditionModel, "
                           f"found {cfg.get('_class_name')!r}")
    _refuse_unsupported(cfg, _UNET_FIXED, path)
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    size = cfg.get("sample_size", 64)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise WeightsError(f"{path}: non-square sample_size {size} is not supported")
        size = size[0]
    for key in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block"):
        if isinstance(cfg.get(key), (list, tuple)):
            raise WeightsError(f"{path}: per-block {key}={cfg[key]} is not supported")
    fields = dict(
        sample_size=int(size), in_channels=cfg.get("in_channels", 4),
        out_channels=cfg.get("out_channels", 4),
        block_out_channels=tuple(cfg.get("block_out_channels", (320, 640, 1280, 1280))),
        down_block_types=tuple(cfg.get("down_block_types", ("CrossAttnDownBlock2D",) * 3
                                       + ("DownBlock2D",))),
        up_block_types=tuple(cfg.get("up_block_types", ("UpBlock2D",)
                                     + ("CrossAttnUpBlock2D",) * 3)),
        layers_per_block=cfg.get("layers_per_block", 2),
        num_attention_heads=tuple(heads) if isinstance(heads, (list, tuple)) else int(heads),
        cross_attention_dim=cfg.get("cross_attention_dim", 1280),
        transformer_layers_per_block=cfg.get("transformer_layers_per_block", 1),
        norm_num_groups=cfg.get("norm_num_groups", 32), norm_eps=cfg.get("norm_eps", 1e-5),
        use_linear_projection=bool(cfg.get("use_linear_projection", False)),
        upcast_attention=bool(cfg.get("upcast_attention", False)),
        flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
        freq_shift=float(cfg.get("freq_shift", 0)))
    return fields


def vae_fields(cfg: dict, path: str = "vae/config.json") -> dict:
    """Our AutoencoderKL's fields from a diffusers `AutoencoderKL` config."""
    if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise WeightsError(f"{path}: _class_name must be AutoencoderKL, found {cfg.get('_class_name')!r}")
    _refuse_unsupported(cfg, _VAE_FIXED, path)
    n = len(cfg.get("block_out_channels", (64,)))
    for key, kind in (("down_block_types", "DownEncoderBlock2D"),
                      ("up_block_types", "UpDecoderBlock2D")):
        types = tuple(cfg.get(key, (kind,) * n))
        if types != (kind,) * n:
            raise WeightsError(f"{path}: {key} must be {n} x {kind}, found {list(types)}")
    return dict(
        in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
        block_out_channels=tuple(cfg.get("block_out_channels", (64,))),
        layers_per_block=cfg.get("layers_per_block", 1),
        latent_channels=cfg.get("latent_channels", 4),
        norm_num_groups=cfg.get("norm_num_groups", 32),
        scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
        shift_factor=float(cfg.get("shift_factor") or 0.0),
        use_quant_conv=bool(cfg.get("use_quant_conv", True)),
        use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
        mid_block_add_attention=bool(cfg.get("mid_block_add_attention", True)))


def text_encoder_fields(cfg: dict, path: str = "text_encoder/config.json") -> dict:
    """Our TextEncoder's fields from a transformers `CLIPTextConfig` (SD 1.x: CLIP ViT-L/14 text,
    quick_gelu; SD 2.x: OpenCLIP ViT-H text as a 23-layer CLIPTextModel with exact gelu)."""
    arch = cfg.get("architectures") or ["CLIPTextModel"]
    if arch != ["CLIPTextModel"]:
        raise WeightsError(f"{path}: architectures must be ['CLIPTextModel'], found {arch}")
    return dict(
        vocab_size=cfg.get("vocab_size", 49408), hidden_size=cfg.get("hidden_size", 512),
        intermediate_size=cfg.get("intermediate_size", 2048),
        num_hidden_layers=cfg.get("num_hidden_layers", 12),
        num_attention_heads=cfg.get("num_attention_heads", 8),
        max_position_embeddings=cfg.get("max_position_embeddings", 77),
        hidden_act=cfg.get("hidden_act", "quick_gelu"),
        layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
        eos_token_id=cfg.get("eos_token_id", 49407))


def schedule_fields(cfg: dict, path: str = "scheduler/scheduler_config.json") -> dict:
    """`diffusion.make_schedule` keyword arguments from a diffusers scheduler config (DDIM, PNDM,
    DDPM, Euler, ... share these keys; missing keys take DDIMScheduler's defaults)."""
    if cfg.get("trained_betas") is not None:
        raise WeightsError(f"{path}: trained_betas is not supported; use beta_start/beta_end")
    if cfg.get("rescale_betas_zero_snr"):
        raise WeightsError(f"{path}: rescale_betas_zero_snr=true is not supported")
    return {k: cfg.get(k, v) for k, v in _SCHEDULE_DEFAULTS.items()}


# ---------------------------------------------------------------------------------------------
# Weights.
# ---------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Memory-maps a .safetensors file into numpy arrays (bf16 as ml_dtypes.bfloat16).

    The format: an 8-byte little-endian header size, a JSON header {name: {dtype, shape,
    data_offsets}}, then the raw tensor bytes. `safetensors.numpy` cannot represent bf16, and
    memory-mapping keeps a multi-GB UNet from being held twice while it is converted.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a {size}-byte file")
            header = json.loads(f.read(n))
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise WeightsError(f"{path}: tensor {key!r} has unsupported dtype {info.get('dtype')}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end > data.size or end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise WeightsError(f"{path}: tensor {key!r} lies outside the file (truncated?)")
        out[key] = data[begin:end].view(dtype).reshape(shape)
    return out


def read_torch_bin(path: str) -> dict[str, np.ndarray]:
    """A PyTorch .bin state dict as numpy arrays (needs torch)."""
    try:
        import torch
    except ImportError:
        raise WeightsError(f"{path} is a PyTorch .bin file and reading it needs torch "
                           f"(pip install torch), or use the folder's .safetensors weights") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        raise WeightsError(f"{path}: not a readable PyTorch state dict "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors")
    return {k: _to_numpy(v) for k, v in state.items()}


def _with_variant(name: str, variant: str) -> str:
    """'diffusion_pytorch_model.safetensors' + 'fp16' -> 'diffusion_pytorch_model.fp16.safetensors'
    (diffusers inserts the variant before the last extension, index files included)."""
    if not variant:
        return name
    head, _, ext = name.rpartition(".")
    return f"{head}.{variant}.{ext}"


def weight_files(component_dir: str, component: str, variant: str = "") -> list[str]:
    """The weight file(s) to read for a component, in preference order: full-precision
    safetensors, .bin, then (with variant "") the fp16 variant; sharded checkpoints through their
    index file. `variant` "fp16" reads only the fp16 variant."""
    if variant not in VARIANTS:
        raise ConfigError(f"model.variant must be one of {VARIANTS}, got {variant!r}")
    st_stem, bin_stem = WEIGHT_STEMS[component]
    names = []
    for v in ((variant,) if variant else VARIANTS):
        for stem, ext in ((st_stem, "safetensors"), (bin_stem, "bin")):
            names += [_with_variant(f"{stem}.{ext}", v), _with_variant(f"{stem}.{ext}.index.json", v)]
    for name in names:
        path = os.path.join(component_dir, name)
        if os.path.isfile(path):
            if not name.endswith(".json"):
                return [path]
            weight_map = read_json(path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise WeightsError(f"{path}: no weight_map")
            return [os.path.join(component_dir, f) for f in sorted(set(weight_map.values()))]
    raise WeightsError(f"{component_dir}: no weights file (looked for {', '.join(names[:4])}, ...)")


def read_state_dict(component_dir: str, component: str, variant: str = "") -> tuple[dict, str]:
    """(state dict of numpy arrays, a name for messages) of one component's weights."""
    files = weight_files(component_dir, component, variant)
    state: dict[str, np.ndarray] = {}
    for path in files:
        if not os.path.isfile(path):
            raise WeightsError(f"{path}: file not found (listed in the index)")
        part = read_safetensors(path) if path.endswith(".safetensors") else read_torch_bin(path)
        state.update(part)
    return state, files[0] if len(files) == 1 else f"{component_dir} ({len(files)} shards)"


# ---------------------------------------------------------------------------------------------
# The folder.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Folder:
    """A Stable Diffusion folder's modules (built from its configs) and scheduler settings.

    Attributes:
      path: the folder.
      unet, vae, text_encoder: our Flax modules with the folder's sizes.
      schedule: `diffusion.make_schedule` keyword arguments.
      param_dtype: numpy dtype the `load_*` methods return weights in.
      variant: "" or "fp16" (see `weight_files`).
    """

    path: str
    unet: UNet
    vae: AutoencoderKL | None   # None for a pixel-space pipeline
    text_encoder: TextEncoder
    schedule: dict
    param_dtype: Any = np.float32
    variant: str = ""

    def component(self, name: str) -> str:
        return os.path.join(self.path, name)

    def abstract_unet(self) -> Any:
        """UNet param tree of ShapeDtypeStructs."""
        u = self.unet
        return jax.eval_shape(lambda: u.init(
            jax.random.key(0), jnp.zeros((1, u.sample_size, u.sample_size, u.in_channels)),
            jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, u.cross_attention_dim)))["params"])

    def abstract_vae(self) -> Any:
        v = self.vae
        size = 2 * v.downscale
        return jax.eval_shape(lambda: v.init(
            jax.random.key(0), jnp.zeros((1, size, size, v.in_channels)))["params"])

    def abstract_text_encoder(self) -> Any:
        t = self.text_encoder
        return jax.eval_shape(lambda: t.init(
            jax.random.key(0), jnp.zeros((1, t.max_position_embeddings), jnp.int32))["params"])

    def _load(self, name: str, abstract: Any, prefix: str = "", ignore=(), rename=None) -> dict:
        state, source = read_state_dict(self.component(name), name, self.variant)
        if rename is not None:
            state = rename(state)
        return state_dict_to_params(state, abstract, prefix=prefix, source=source,
                                    dtype=self.param_dtype, strict=True, ignore=ignore)

    def load_unet(self) -> dict:
        """UNet params as numpy arrays (WeightsError if the weights disagree with unet/config.json)."""
        return self._load("unet", self.abstract_unet())

    def load_vae(self) -> dict:
        """VAE params; legacy attention names (query/key/value/proj_attn) are accepted."""
        return self._load("vae", self.abstract_vae(), rename=rename_legacy_attention)

    def load_text_encoder(self) -> dict:
        return self._load("text_encoder", self.abstract_text_encoder(), prefix="text_model.",
                          ignore=(r"position_ids$",))


def open_folder(path: str, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                remat: bool = False, attention_chunk: int = 0, variant: str = "") -> Folder:
    """Reads a folder's configs and builds its modules (no weights are read).

    Args:
      dtype: activation dtype of the UNet, VAE (the text encoder runs in float32: once per epoch).
      param_dtype: dtype of every loaded weight.
      remat: rematerialise UNet blocks in the backward pass.
      attention_chunk: the UNet's attention takes this many queries at a time (0 = all).
    """
    root = os.path.abspath(os.path.expanduser(path))
    pixel_space = check_layout(root).get("_class_name") in PIXEL_SPACE_PIPELINES
    cfg = lambda name, file="config.json": (read_json(os.path.join(root, name, file)),
                                           os.path.join(root, name, file))
    ucfg, upath = cfg("unet")
    vcfg, vpath = cfg("vae") if not pixel_space else (None, None)
    tcfg, tpath = cfg("text_encoder")
    scfg, spath = cfg("scheduler", "scheduler_config.json")
    try:
        unet = UNet(**unet_fields(ucfg, upath), remat=remat, attention_chunk=attention_chunk,
                    dtype=dtype, param_dtype=param_dtype)
        unet.validate()
        vae = None
        if not pixel_space:
            vae = AutoencoderKL(**vae_fields(vcfg, vpath), dtype=dtype, param_dtype=param_dtype)
            vae.validate()
        text_encoder = TextEncoder(**text_encoder_fields(tcfg, tpath), param_dtype=param_dtype)
        text_encoder.validate()
    except ConfigError as e:
        raise WeightsError(f"{root}: {e}") from None
    if unet.cross_attention_dim != text_encoder.hidden_size:
        raise WeightsError(f"{upath}: cross_attention_dim={unet.cross_attention_dim} but the text "
                           f"encoder's hidden_size is {text_encoder.hidden_size} ({tpath})")
    if vae is not None and unet.in_channels != vae.latent_channels:
        raise WeightsError(f"{upath}: in_channels={unet.in_channels} but the VAE has "
                           f"latent_channels={vae.latent_channels} ({vpath})")
    return Folder(path=root, unet=unet, vae=vae, text_encoder=text_encoder,
                  schedule=schedule_fields(scfg, spath), param_dtype=np.dtype(param_dtype),
                  variant=variant)

