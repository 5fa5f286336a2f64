"""The first runnable config: a tiny pixel-space UNet from random init, finetuned on CPU to make
its 16x16 samples JPEG-compressible. Recipes: 'prdp' (default) and 'ddpo' (same setup).

    python -m prdp_jax.main --config configs/jpeg_tiny.py            # PRDP
    python -m prdp_jax.main --config configs/jpeg_tiny.py:ddpo       # DDPO baseline
"""
from prdp_jax.config import base_config
from prdp_jax.infra.errors import ConfigError

RECIPES = ("prdp", "ddpo")


def get_config(recipe: str = "prdp"):
    recipe = recipe or "prdp"
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r} for jpeg_tiny; known: {', '.join(RECIPES)}")
    c = base_config()
    c.method = recipe
    c.prompts.train = "animal_names"       # One-word prompts: a 48-word vocabulary.
    c.model.text_encoder.max_position_embeddings = 4
    # Attention only at 8x8: on a CPU, 16x16 self-attention doubles the cost for little gain.
    c.model.unet.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D")
    c.model.unet.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D")
    c.reward.weights = {"jpeg_compressibility": 1.0}
    c.sample.num_steps = 10                # Short chains keep an epoch to seconds on a CPU.
    c.sample.guidance_scale = 2.0
    c.train.epochs = 20
    c.train.prompts_per_epoch = 8
    c.train.images_per_prompt = 4
    c.train.passes_per_epoch = 1
    c.train.prompts_per_minibatch = 2      # Four optimiser steps per epoch; the clip binds from the
                                           # 2nd. (Two steps of 4 prompts learn far less reliably.)
    c.train.microbatch_trajectories = 8
    c.train.microbatch_steps = 10
    c.train.learning_rate = 1e-3           # From-scratch tiny model: far larger than SD's 1e-5.
    c.prdp.beta = 1e-3                     # Rewards differ by ~0.01 kB; targets of ~10 nats.
    c.prdp.clip_eps = 1e-2
    c.ddpo.clip_range = 1e-2
    c.ddpo.min_count = 4
    c.log.grid_every_epochs = 5
    return c
