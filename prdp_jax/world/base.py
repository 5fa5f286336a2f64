"""The world's base model: pretrained once on rendered (image, caption) pairs, cached, reused.

The cache (`world.base_dir`) is an Orbax checkpoint holding the UNet and text-encoder params and,
as JSON, the config they were trained with. A cache trained with a different world, model, schedule
or pretraining config is refused with the differing fields named, never silently reused.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from prdp_jax import diffusion
from prdp_jax import pretrain as pretrain_lib
from prdp_jax.checkpoint import Checkpointer
from prdp_jax.world import grammar, render
from prdp_jax.world.prompts import world_splits


def fingerprint(config: ml_collections.ConfigDict) -> dict:
    """Everything the base's weights depend on."""
    d = json.loads(json.dumps(config.to_dict(), default=str))
    world = {k: v for k, v in d["world"].items() if k != "base_dir"}
    return {"world": world, "unet": d["model"]["unet"], "text_encoder": d["model"]["text_encoder"],
            "init_seed": d["model"]["init_seed"], "schedule": d["schedule"],
            "pretrain": d["pretrain"], "grammar": {"vocabulary": grammar.VOCABULARY,
                                                   "heldout_pairs": [list(p) for p in grammar.HELDOUT_PAIRS]}}


def batches(config: ml_collections.ConfigDict, tokenizer):
    """step -> (images [B, S, S, 3] in [-1, 1], ids [B, L]): captions drawn from the large split,
    rendered with a per-image seeded jitter; a pure function of (config, step)."""
    large = world_splits(config).large
    size, batch = config.world.image_size, config.pretrain.batch_size

    def fn(step: int):
        rng = np.random.default_rng([config.pretrain.seed, step])
        captions = [large[i] for i in rng.integers(0, len(large), batch)]
        scenes = [grammar.parse(c) for c in captions]
        seeds = [int(s) for s in rng.integers(0, 2 ** 31, batch)]
        return render.render_batch(scenes, size, seeds) * 2.0 - 1.0, tokenizer(captions)

    return fn


def load_or_pretrain(config: ml_collections.ConfigDict, mesh, unet, text_encoder, tokenizer,
                     init_params: dict, shardings: dict, log=print, show_progress: bool = True) -> dict:
    """The base params {'unet', 'text_encoder'}, restored from the cache or pretrained into it.

    Args:
      init_params: a fresh init (sharded); used only when pretraining.
      shardings: the NamedShardings of the params tree.
    """
    directory = os.path.expanduser(config.world.base_dir)
    ckpt = Checkpointer(directory, max_to_keep=1, fingerprint=fingerprint(config), what="base model",
                        mismatch_advice="delete that directory or set --config.world.base_dir to "
                                        "another one to pretrain a new base")
    step = ckpt.latest_epoch()
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            init_params, shardings)
    if step is not None:
        params, meta = ckpt.restore(step, abstract)
        log(f"reusing the base model in {ckpt.directory} ({step} pretraining steps, "
            f"{meta.get('seconds', 0):.0f}s)")
        ckpt.close()
        return params
    schedule = diffusion.make_schedule(**config.schedule.to_dict())
    log(f"pretraining the world's base model into {ckpt.directory} "
        f"({config.pretrain.steps} steps of {config.pretrain.batch_size} images)")
    params, info = pretrain_lib.pretrain(unet, text_encoder, init_params, shardings,
                                         batches(config, tokenizer), tokenizer([""]), schedule,
                                         config.pretrain, mesh, log=log, show_progress=show_progress)
    ckpt.save(config.pretrain.steps, params, {"seconds": info["seconds"], "loss": info["loss"]})
    ckpt.close()
    return jax.tree.map(jnp.asarray, params)
