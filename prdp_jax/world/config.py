"""Config sections of the embedded world and of base-model pretraining (see configs/world.py)."""
from __future__ import annotations

import ml_collections


def add_world_sections(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c.world = w = ml_collections.ConfigDict()
    w.image_size = 24               # Rendered images are image_size^2 RGB (a multiple of 3).
    w.seed = 0                      # Seeds the prompt splits.
    w.small_prompts = 32            # Size of the small split (the paper's 45 animals).
    w.large_prompts = 8192          # Size of the large split (the paper's 100K+ prompts).
    w.large_sample_prompts = 64     # Fixed evaluation sample of the large split.
    w.heldout_prompts = 128         # Captions with unseen colour-shape pairs.
    w.base_dir = ""                 # The base model's folder ("" = the one that ships with prdp-jax,
                                    # prdp_jax/world/base_model); make another with
                                    # python -m prdp_jax.world.pretrain --out DIR.
    w.pretrain_missing = False      # Pretrain the base into world.base_dir if that folder does not
                                    # exist (tiny smoke runs); otherwise a missing base is an error.

    c.pretrain = p = ml_collections.ConfigDict()
    p.steps = 1000                  # Optimiser steps of base pretraining.
    p.batch_size = 32               # Rendered (image, caption) pairs per step.
    p.learning_rate = 1e-3          # Peak AdamW learning rate (linear warmup, cosine decay to 10%).
    p.warmup_steps = 50             # Warmup steps.
    p.weight_decay = 1e-4           # AdamW weight decay.
    p.max_grad_norm = 1.0           # Global-norm gradient clip.
    p.cfg_dropout = 0.1             # Probability of training on the empty caption (for CFG).
    p.ema_decay = 0.99              # The base keeps an EMA of the weights with this decay.
    p.seed = 0                      # Seeds pretraining batches and noise.
    p.checkpoint_every = 250        # Save the pretraining state every this many steps (resumable).
    return c
