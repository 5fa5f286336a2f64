"""Memory plan for Stable Diffusion runs: per-device bytes from ahead-of-time compiles on a
simulated device mesh, with no weights and no accelerator.

    python -m prdp_jax.memory_plan                              # SD 1.4, both scales, 8 and 64
    python -m prdp_jax.memory_plan --devices 8 --scales large --layouts fsdp_remat

For each scale of `configs/sd.py` (small: 32 prompts x 16 images, K=10; large: 64 x 8, K=1; both
50 DDPM steps with CFG at 512 px), device count and layout, a child process with that many
simulated CPU devices builds the trainer on SD 1.4's published architecture (abstract params only:
nothing full-size is allocated), compiles the sampling, scoring, gradient-tile and optimiser steps
exactly as a run does, and reads XLA's memory analysis of each. Layouts:

  replicated   mesh data=N: every device holds the whole UNet, its AdamW moments, the gradient
               accumulator and the frozen reference
  fsdp         mesh fsdp=N: all of those split N ways (the batch is split over all N either way)
  fsdp_remat   fsdp, with the UNet blocks rematerialised in the backward pass (the recipes' default)

The per-device bytes are: trainable params (float32), AdamW moments, the float32 gradient
accumulator, the frozen reference UNet, the frozen text encoder and VAE, the reward models (held
replicated), the stored trajectories of an epoch (chains x_T..x_0, prompt embeddings, log-probs;
the sampler's output and its minibatch arrangement both live while an epoch updates), and the
activations: the largest temp allocation of the compiled steps. XLA:CPU's buffer assignment stands
in for the accelerator's: fusion and convolution workspaces differ there, so read it as an
estimate with a margin, not a guarantee.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import time

LAYOUTS = ("replicated", "fsdp", "fsdp_remat")
SCALES = {"small": "small_hpsv2", "large": "large_hpsv2"}
GIB = 2 ** 30

# Stable Diffusion v1.4's published component configs (CompVis/stable-diffusion-v1-4 on the hub:
# unet/, text_encoder/ and vae/config.json), as our loaders read them.
SD14_UNET = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"]}
SD14_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
             "num_hidden_layers": 12, "max_position_embeddings": 77, "vocab_size": 49408,
             "hidden_act": "quick_gelu", "eos_token_id": 2}
SD14_VAE = {"act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
            "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
            "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "scaling_factor": 0.18215}
# The reward models' published CLIP configs (transformers field names): PickScore_v1 and HPSv2
# are ViT-H-14 (both towers); the aesthetic predictor uses ViT-L/14's vision tower and an MLP.
CLIP_H = {"projection_dim": 1024,
          "vision_config": {"hidden_size": 1280, "intermediate_size": 5120,
                            "num_attention_heads": 16, "num_hidden_layers": 32, "patch_size": 14,
                            "image_size": 224, "hidden_act": "gelu"},
          "text_config": {"hidden_size": 1024, "intermediate_size": 4096,
                          "num_attention_heads": 16, "num_hidden_layers": 24,
                          "max_position_embeddings": 77, "vocab_size": 49408,
                          "hidden_act": "gelu"}}
CLIP_L_VISION = {"projection_dim": 768,
                 "vision_config": {"hidden_size": 1024, "intermediate_size": 4096,
                                   "num_attention_heads": 16, "num_hidden_layers": 24,
                                   "patch_size": 14, "image_size": 224,
                                   "hidden_act": "quick_gelu"}}
AESTHETIC_MLP = 768 * 1024 + 1024 + 1024 * 128 + 128 + 128 * 64 + 64 + 64 * 16 + 16 + 16 + 1
REWARD_SETS = {"hpsv2": ("hpsv2",), "pickscore": ("pickscore",),
               "multi": ("pickscore", "hpsv2", "aesthetic")}
# Each recipe of configs/sd.py: its scale and the reward models it holds.
RECIPES = {"small_hpsv2": ("small", "hpsv2"), "small_pickscore": ("small", "pickscore"),
           "large_hpsv2": ("large", "hpsv2"), "large_pickscore": ("large", "pickscore"),
           "large_multi": ("large", "multi")}
# Per-device memory of the accelerators the table considers, and how many devices one unit has.
HARDWARE = (("TPU v5e", 16), ("TPU v4", 32), ("A100 40GB", 40), ("A100/H100 80GB", 80),
            ("TPU v5p", 95))


def sd_config(scale: str, devices: int, layout: str):
    """The `configs/sd.py` recipe of `scale`, on `devices` devices in `layout`."""
    from prdp_jax import config as config_lib
    c = config_lib.load_named("sd", SCALES[scale])
    c.mesh.devices = devices
    c.mesh.data, c.mesh.fsdp = (devices, 1) if layout == "replicated" else (1, devices)
    c.model.remat = layout == "fsdp_remat"
    # The gradient tile is 8 trajectories x 2 steps on 8 devices; keep its per-device share (one
    # trajectory) on more devices, where a tile must hold a multiple of the device count.
    c.train.microbatch_trajectories = max(c.train.microbatch_trajectories, devices)
    c.sample.batch_size = max(c.sample.batch_size, devices)
    c.log.compile_cache = ""
    return c


class _Tokenizer:
    """Stands in for the CLIP tokenizer: the trainer's compile only needs its length."""
    max_length = SD14_TEXT["max_position_embeddings"]


def abstract_pipeline(config, mesh):
    """SD 1.4's Pipeline with abstract (sharded ShapeDtypeStruct) params: no weights, no memory."""
    import jax
    from prdp_jax.infra import sharding
    from prdp_jax.models import diffusers_folder
    from prdp_jax.models.text_encoder import TextEncoder
    from prdp_jax.models.unet import UNet
    from prdp_jax.models.vae import AutoencoderKL
    from prdp_jax.pipelines.base import DTYPES, Pipeline, score_dtype_of
    m = config.model
    kw = dict(dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype])
    unet = UNet(**diffusers_folder.unet_fields(SD14_UNET), remat=bool(m.remat),
                attention_chunk=int(m.attention_chunk), **kw)
    vae = AutoencoderKL(**diffusers_folder.vae_fields(SD14_VAE), **kw)
    text = TextEncoder(**diffusers_folder.text_encoder_fields(SD14_TEXT), **kw)
    folder = diffusers_folder.Folder(path="", unet=unet, vae=vae, text_encoder=text, schedule={})
    rules = sharding.parse_rules(config.mesh.rules)

    def placed(tree):
        shardings = sharding.tree_shardings(tree, mesh, rules, config.mesh.fsdp_min_size)
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            tree, shardings)

    frozen = {"text_encoder": placed(folder.abstract_text_encoder()),
              "vae": placed(folder.abstract_vae())}
    decode = lambda params, latents: vae.apply({"params": params["vae"]}, latents,
                                               method=AutoencoderKL.decode_latents)
    size = 512 // vae.downscale
    abstract_unet = placed(folder.abstract_unet())
    pipe = Pipeline(unet=unet, text_encoder=text, tokenizer=_Tokenizer(),
                    latent_shape=(size, size, unet.in_channels), decode=decode,
                    unet_params=None, frozen_params=None, abstract_unet_params=abstract_unet,
                    score_dtype=score_dtype_of(config),
                    gather=sharding.gather_over_fsdp(
                        jax.tree.map(lambda a: a.sharding, abstract_unet)))
    return pipe, frozen


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the most loaded device)."""
    import jax
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.shape else ()
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


@functools.lru_cache(maxsize=None)
def reward_bytes(rewards: tuple) -> int:
    """float32 bytes of the reward models (each held replicated on every device)."""
    import jax
    from prdp_jax.models import clip
    count = lambda cfg, **towers: sum(math.prod(a.shape) for a in jax.tree.leaves(
        clip.from_hf_config(cfg, **towers).abstract_params()))
    sizes = {"pickscore": count(CLIP_H), "hpsv2": count(CLIP_H),
             "aesthetic": count(CLIP_L_VISION, text=False) + AESTHETIC_MLP}
    return 4 * sum(sizes[r] for r in rewards)


def precision(config) -> dict:
    """The recipe's precision policy: the sampler's and the scorer's activation dtypes."""
    return {"dtype": config.model.dtype, "score_dtype": config.model.score_dtype or config.model.dtype}


def measure(scale: str, devices: int, layout: str) -> dict:
    """Compiles one configuration (in this process, which must have `devices` devices)."""
    import jax
    import jax.numpy as jnp
    from prdp_jax.infra import sharding
    from prdp_jax.training import epoch as epoch_lib
    config = sd_config(scale, devices, layout)
    mesh = sharding.mesh_from_config(config.mesh)
    pipe, frozen = abstract_pipeline(config, mesh)
    setup, stats = epoch_lib.compile_setup(epoch_lib.make_setup(config, pipe, mesh), frozen,
                                           log=lambda *a: None)
    state = setup.abstract_state()
    shards = sharding.batch_shards(mesh)
    M, n, T = setup.shape.minibatches, setup.shape.minibatch_trajectories, setup.num_steps
    latent = math.prod(pipe.latent_shape)
    L, D = _Tokenizer.max_length, pipe.text_encoder.hidden_size
    traj = M * n * ((T + 1) * latent + L * D + 2 * T + 2) * 4  # f32 epoch arrays, all devices
    sampled = setup.shape.trajectories * ((T + 1) * latent + T) * 4    # the sampler's output, kept too
    params = per_device_bytes(state.params)
    grads = per_device_bytes(jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=a.sharding), state.params))
    return {
        "scale": scale, "devices": devices, "layout": layout, "precision": precision(config),
        "unet_params": sum(math.prod(a.shape) for a in jax.tree.leaves(state.params)),
        "bytes": {
            "params": params, "optimizer": per_device_bytes(state.opt_state),
            "gradient": grads, "reference": params,
            "text_encoder_vae": per_device_bytes(frozen),
            "trajectories": math.ceil((traj + sampled) / shards),
            "activations": max(s["temp_bytes"] for s in stats.values()),
        },
        "compiled": stats,
        "tile": {"trajectories": setup.ctx.tiling.trajectories,
                 "steps": setup.ctx.tiling.steps_per_tile,
                 "sample_batch": setup.shape.sample_batch},
    }


def run_child(scale: str, devices: int, layout: str, timeout: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, "-m", "prdp_jax.memory_plan", "--child", scale, str(devices), layout]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[3:])} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def totals(row: dict, rewards: tuple) -> dict:
    b = dict(row["bytes"], rewards=reward_bytes(rewards))
    b["total"] = sum(b.values())
    return b


def smallest_fit(rows: list, scale: str, rewards: tuple) -> list[str]:
    """For each accelerator, the fewest devices (of the planned counts) and the layout that fits
    with 10% headroom."""
    out = []
    for name, gib in HARDWARE:
        fits = [(r["devices"], LAYOUTS.index(r["layout"]), r["layout"]) for r in rows
                if r["scale"] == scale and totals(r, rewards)["total"] * 1.1 <= gib * GIB]
        if fits:
            devices, _, layout = min(fits)
            out.append(f"{name}: {devices} devices, {layout}")
        else:
            out.append(f"{name}: none of the planned counts")
    return out


def _policy(rows: list) -> str:
    """The precision policy of the rows, in words (docs/stable_diffusion.md#precision)."""
    p = rows[0].get("precision", {"dtype": "bfloat16", "score_dtype": "bfloat16"}) if rows else {}
    if not p or p["dtype"] == p["score_dtype"]:
        return f"{p.get('dtype', '?')} activations"
    return (f"{p['dtype']} activations in the sampler and {p['score_dtype']} wherever stored "
            f"transitions are scored (model.score_dtype)")


def markdown(rows: list) -> str:
    gib = lambda v: f"{v / GIB:.2f}"
    head = ("| scale | devices | layout | params | AdamW | gradient | reference | text enc. + VAE "
            "| trajectories | activations | total (no reward) | compile s (sample / score / grad "
            "/ apply) |")
    lines = [
        "# Memory plan: Stable Diffusion 1.4 at 512 px", "",
        "Per-device GiB from ahead-of-time compiles of the real training steps on a simulated "
        "CPU mesh (`python -m prdp_jax.memory_plan`; no weights, no accelerator). Small scale: "
        "32 prompts x 16 images, K=10; large: 64 x 8, K=1; both 50 DDPM steps with CFG 5, "
        + _policy(rows) + "; float32 weights, AdamW moments and gradient. Activations are XLA's "
        "largest temp allocation among the sampling, scoring, gradient-tile and optimiser steps "
        "(XLA:CPU's buffer assignment: an estimate of the accelerator's, not a guarantee). "
        "The reward models are held replicated on every device, in float32: "
        + ", ".join(f"{name} {reward_bytes(r) / GIB:.2f} GiB" for name, r in REWARD_SETS.items())
        + ".", "", head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in rows:
        b = r["bytes"]
        c = r["compiled"]
        lines.append(
            f"| {r['scale']} | {r['devices']} | {r['layout']} | {gib(b['params'])} | "
            f"{gib(b['optimizer'])} | {gib(b['gradient'])} | {gib(b['reference'])} | "
            f"{gib(b['text_encoder_vae'])} | {gib(b['trajectories'])} | {gib(b['activations'])} | "
            f"{gib(sum(b.values()))} | "
            + " / ".join(f"{c[k]['seconds']:.0f}" for k in ("sample", "score", "grad_tile", "apply"))
            + " |")
    lines += ["", "Reading it: FSDP here gathers the UNet's weights in full inside each step "
              "(`sharding.gather_over_fsdp`: each weight is all-gathered where it is used and its "
              "gradient reduce-scattered back), so the gathered float32 weights and the full "
              "gradient of a tile are temp memory and the activations column matches the "
              "replicated layout's; what FSDP divides is the persistent state (params, AdamW "
              "moments, gradient accumulator, reference). Rematerialising whole UNet blocks "
              "barely moves the peak at this tile (one trajectory x 2 steps x CFG = 4 images per "
              "device): it sits in the gathered weights plus the recomputation of the 64x64 "
              "blocks. Attention runs 1024 queries at a time (`model.attention_chunk`, the "
              "recipes' default); at once, the 4096-token logits take the gradient tile's temp "
              "from about 10 to 38 GiB (8 devices, fsdp_remat, measured before weight "
              "gathering).",
              "", "## Smallest configuration per recipe", "",
              "With the recipe's reward models and 10% headroom, among the planned device counts "
              "(a layout needs the devices to divide the batch: more devices than listed work "
              "too).", "", "| recipe | " + " | ".join(h for h, _ in HARDWARE) + " |",
              "|" + "|".join(["---"] * (len(HARDWARE) + 1)) + "|"]
    for recipe, (scale, rewards) in RECIPES.items():
        fits = smallest_fit(rows, scale, REWARD_SETS[rewards])
        lines.append(f"| {recipe} | " + " | ".join(f.split(": ", 1)[1] for f in fits) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m prdp_jax.memory_plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, nargs="+", default=[8, 64])
    p.add_argument("--scales", nargs="+", choices=sorted(SCALES), default=["small", "large"])
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    p.add_argument("--out", default="docs/memory_plan", help="writes OUT.json and OUT.md")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per configuration")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        scale, devices, layout = args.child
        print(json.dumps(measure(scale, int(devices), layout)))
        return 0
    rows = []
    path = args.out + ".json"
    if os.path.exists(path):  # rows of another precision policy are measured again
        with open(path) as f:
            rows = [r for r in json.load(f)["rows"]
                    if r.get("precision") == precision(sd_config(r["scale"], 8, "fsdp"))]
    for scale in args.scales:
        for devices in args.devices:
            for layout in args.layouts:
                key = (scale, devices, layout)
                if any((r["scale"], r["devices"], r["layout"]) == key for r in rows):
                    continue
                t0 = time.perf_counter()
                row = run_child(scale, devices, layout, args.timeout)
                rows.append(row)
                print(f"{scale} {devices} {layout}: "
                      f"{sum(row['bytes'].values()) / GIB:.2f} GiB per device "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
                _write(args.out, rows)
    _write(args.out, rows)
    return 0


def _write(out: str, rows: list) -> None:
    from prdp_jax.infra.files import atomic_write_bytes
    order = lambda r: (list(SCALES).index(r["scale"]), r["devices"], LAYOUTS.index(r["layout"]))
    rows = sorted(rows, key=order)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    atomic_write_bytes(out + ".json", (json.dumps({"rows": rows}, indent=1) + "\n").encode())
    atomic_write_bytes(out + ".md", markdown(rows).encode())


if __name__ == "__main__":
    sys.exit(main())
