"""The world's base model: pretrained once, shipped as a verified folder, loaded like SD weights.

`pretrain_base` trains the UNet and text encoder on the world's degraded pretraining mix
(`degrade.py`), resumably (an Orbax state folder saved every few hundred steps), and writes the
diffusers-style folder of `base_folder.py`. `open_base` verifies a folder against its manifest, refuses
one made with another world config (naming the differing fields), and reads its weights through
`models/diffusers_folder.py`, the code that reads Stable Diffusion folders.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from prdp_jax.core import diffusion
from prdp_jax.infra import runtime, sharding
from prdp_jax.infra.errors import ConfigError, WeightsError
from prdp_jax.models import diffusers_folder
from prdp_jax.models.tokenizers import WordTokenizer
from prdp_jax.pipelines import base as pipeline_base
from prdp_jax.training import pretrain as pretrain_lib
from prdp_jax.training.checkpoint import Checkpointer
from prdp_jax.world import base_folder, degrade, grammar
from prdp_jax.world.prompts import world_splits

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "base_model")
# The world fields the base's pretraining data depend on (the large split's captions). The
# evaluation splits' sizes (large_sample_prompts, heldout_prompts) may change freely.
BASE_WORLD_FIELDS = ("image_size", "seed", "small_prompts", "large_prompts")


def base_dir(config: ml_collections.ConfigDict) -> str:
    """The base folder a config names ('' = the base that ships with the project)."""
    return os.path.abspath(os.path.expanduser(config.world.base_dir or SHIPPED))


def world_record(config: ml_collections.ConfigDict) -> dict:
    """What the base's weights depend on besides its architecture: world, grammar, pretraining."""
    d = json.loads(json.dumps(config.to_dict(), default=str))
    world = {k: d["world"][k] for k in BASE_WORLD_FIELDS}
    return {"world": world, "pretrain": d["pretrain"], "init_seed": d["model"]["init_seed"],
            "degradations": degrade.DEGRADATIONS,
            "grammar": {"vocabulary": grammar.VOCABULARY,
                        "heldout_pairs": [list(p) for p in grammar.HELDOUT_PAIRS]}}


def batches(config: ml_collections.ConfigDict, tokenizer):
    """step -> (images [B, S, S, 3] in [-1, 1], ids [B, L]): captions drawn from the large split,
    each rendered clean or degraded (`degrade.py`); a pure function of (config, step)."""
    large = world_splits(config).large
    size, batch = config.world.image_size, config.pretrain.batch_size

    def fn(step: int):
        rng = np.random.default_rng([config.pretrain.seed, step])
        captions = [large[i] for i in rng.integers(0, len(large), batch)]
        images, _ = degrade.pretraining_batch(captions, size, rng)
        return images * 2.0 - 1.0, tokenizer(captions)

    return fn


def pretrain_base(config: ml_collections.ConfigDict, out: str, state_dir: str, log=print,
                  show_progress: bool = True) -> str:
    """Pretrains the base of `config` (resuming from `state_dir`) and writes its folder to `out`."""
    mesh = sharding.mesh_from_config(config.mesh)
    length = config.model.text_encoder.max_position_embeddings
    tokenizer = WordTokenizer(grammar.VOCABULARY, max_length=length)
    unet = pipeline_base.unet_from_config(config)
    text_encoder = pipeline_base.text_encoder_from_config(config, tokenizer.vocab_size)
    size = unet.sample_size
    key_unet, key_text = jax.random.split(jax.random.key(config.model.init_seed))
    unet_init, _, unet_shardings = pipeline_base.init_sharded(
        unet, mesh, config, key_unet, jnp.zeros((1, size, size, unet.in_channels)),
        jnp.zeros((1,), jnp.int32), jnp.zeros((1, length, unet.cross_attention_dim)))
    text_init, _, text_shardings = pipeline_base.init_sharded(
        text_encoder, mesh, config, key_text, jnp.zeros((1, length), jnp.int32))
    schedule_kwargs = config.schedule.to_dict()
    record = world_record(config)
    # The state also depends on the architecture and schedule (the folder records those itself).
    d = json.loads(json.dumps(config.to_dict(), default=str))
    state_fingerprint = dict(record, unet=d["model"]["unet"], schedule=d["schedule"],
                             text_encoder=d["model"]["text_encoder"])
    checkpointer = Checkpointer(state_dir, max_to_keep=1, fingerprint=state_fingerprint,
                                what="pretraining state",
                                mismatch_advice="use another --state folder to pretrain afresh")
    try:
        params, info = pretrain_lib.pretrain(
            unet, text_encoder, {"unet": unet_init(key_unet), "text_encoder": text_init(key_text)},
            {"unet": unet_shardings, "text_encoder": text_shardings},
            batches(config, tokenizer), tokenizer([""]), diffusion.make_schedule(**schedule_kwargs),
            config.pretrain, mesh, log=log, show_progress=show_progress,
            checkpointer=checkpointer, checkpoint_every=config.pretrain.checkpoint_every)
    finally:
        checkpointer.close()
    host = jax.tree.map(np.asarray, params)
    record["training"] = {"seconds": round(info["seconds"], 1), "loss_every_25_steps":
                          [round(v, 5) for v in info["loss"]], "cpu": runtime.host()["cpu"]}
    base_folder.write(out, host, unet, text_encoder, grammar.VOCABULARY, schedule_kwargs, record)
    log(f"wrote the base to {out}")
    return out


def check_world(root: str, config: ml_collections.ConfigDict) -> None:
    """Refuses a base made with another world, grammar or pretraining config, naming the fields."""
    saved = base_folder.read_world(root)
    now = world_record(config)
    diff = []
    for section in ("world", "grammar"):
        a, b = saved.get(section, {}), now[section]
        diff += [f"{section}.{k}: base {a.get(k)!r}, config {b.get(k)!r}"
                 for k in b if a.get(k) != b.get(k)]
    if diff:
        raise ConfigError(f"the base {root} was made with a different world config "
                          f"({'; '.join(diff[:3])}); point --config.world.base_dir at a base made "
                          f"with this config (python -m prdp_jax.world.pretrain --out DIR)")


def open_base(config: ml_collections.ConfigDict) -> diffusers_folder.Folder:
    """Verifies and opens the base folder of `config` (pretraining it first if the config asks
    for that with `world.pretrain_missing` and the folder does not exist)."""
    root = base_dir(config)
    if not os.path.exists(root):
        if not config.world.pretrain_missing:
            raise ConfigError(f"world.base_dir {root} does not exist; make a base there with "
                              f"python -m prdp_jax.world.pretrain --out {root}, or leave "
                              f"world.base_dir empty for the base that ships with prdp-jax")
        pretrain_base(config, root, root + ".state", show_progress=bool(config.log.progress))
    if not os.path.isdir(root):
        raise ConfigError(f"world.base_dir {root} is not a directory")
    base_folder.verify(root)
    check_world(root, config)
    try:
        return diffusers_folder.open_folder(root)
    except WeightsError as e:
        raise WeightsError(f"world.base_dir: {e}") from None
