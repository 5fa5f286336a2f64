"""The world's base model as a diffusers-style folder with a checksum manifest.

    model_index.json                 components and their classes
    unet/config.json                 diffusers UNet2DConditionModel config (pixel space, no VAE)
    unet/diffusion_pytorch_model.safetensors
    text_encoder/config.json         transformers CLIPTextConfig
    text_encoder/model.safetensors   CLIPTextModel weights ("text_model." keys)
    tokenizer/vocab.json             the world's closed vocabulary (prdp_jax.models.tokenizers.WordTokenizer)
    scheduler/scheduler_config.json  the noise schedule it was trained with
    world.json                       the world and pretraining config it was trained with
    manifest.json                    size and SHA-256 of every other file

It is read through the same folder code as Stable Diffusion (`models/diffusers_folder.py`). Before
anything is read, every file is checked against the manifest: a missing, truncated or altered
file stops with one error naming it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import numpy as np

from prdp_jax.infra.errors import WeightsError

MANIFEST = "manifest.json"
WORLD = "world.json"
INDEX = {
    "_class_name": "PRDPWorldPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["prdp_jax", "WordTokenizer"],
    "scheduler": ["diffusers", "DDPMScheduler"],
}


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(root: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel != MANIFEST:
                out.append(rel.replace(os.sep, "/"))
    return sorted(out)


def write_manifest(root: str) -> dict:
    manifest = {"files": {rel: {"bytes": os.path.getsize(os.path.join(root, rel)),
                                "sha256": sha256(os.path.join(root, rel))}
                          for rel in _files(root)}}
    with open(os.path.join(root, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    return manifest


def verify(root: str) -> None:
    """Checks every file of the folder against its manifest; WeightsError names the first bad one."""
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        raise WeightsError(f"{root}: no {MANIFEST}, so the base cannot be verified; write it with "
                           f"python -m prdp_jax.world.pretrain")
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{path}: not a readable manifest ({e})") from None
    for rel, entry in sorted(files.items()):
        full = os.path.join(root, rel)
        if not os.path.isfile(full):
            raise WeightsError(f"{full}: missing (listed in {MANIFEST}); restore the base folder, "
                               f"e.g. git checkout -- {root}")
        size = os.path.getsize(full)
        if size != entry["bytes"]:
            raise WeightsError(f"{full}: {size} bytes, the manifest says {entry['bytes']} "
                               f"(truncated or replaced); restore the base folder")
        if sha256(full) != entry["sha256"]:
            raise WeightsError(f"{full}: its SHA-256 differs from {MANIFEST} (the file was "
                               f"altered); restore the base folder")
    extra = sorted(set(_files(root)) - set(files))
    if extra:
        raise WeightsError(f"{os.path.join(root, extra[0])}: not in {MANIFEST}; remove it")


def read_world(root: str) -> dict:
    path = os.path.join(root, WORLD)
    if not os.path.isfile(path):
        raise WeightsError(f"{root}: no {WORLD}; not a world base folder")
    with open(path) as f:
        return json.load(f)


def text_encoder_config(encoder) -> dict:
    """A transformers CLIPTextConfig for our TextEncoder's fields."""
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
            "vocab_size": encoder.vocab_size, "hidden_size": encoder.hidden_size,
            "intermediate_size": encoder.intermediate_size,
            "num_hidden_layers": encoder.num_hidden_layers,
            "num_attention_heads": encoder.num_attention_heads,
            "max_position_embeddings": encoder.max_position_embeddings,
            "hidden_act": encoder.hidden_act, "layer_norm_eps": encoder.layer_norm_eps,
            "eos_token_id": encoder.eos_token_id, "bos_token_id": 2, "pad_token_id": 0,
            "projection_dim": encoder.hidden_size}


def scheduler_config(schedule: dict) -> dict:
    return {"_class_name": "DDPMScheduler", "clip_sample": False, **schedule}


def write(out: str, params: dict, unet, text_encoder, vocabulary: list[str], schedule: dict,
          world: dict) -> None:
    """Writes the folder into a temporary sibling and renames it to `out` (which must not exist).

    Args:
      params: {'unet': ..., 'text_encoder': ...} numpy param trees.
      schedule: `diffusion.make_schedule` keyword arguments.
      world: JSON-ready record of the world and pretraining config (and training statistics).
    """
    from safetensors.numpy import save_file

    from prdp_jax.export import diffusers_unet_config, write_unet
    from prdp_jax.models.convert import params_to_state_dict
    out = os.path.abspath(out)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        write_json = lambda rel, obj: _write_json(os.path.join(tmp, rel), obj)
        write_json("model_index.json", INDEX)
        write_unet(os.path.join(tmp, "unet"), params["unet"], diffusers_unet_config(unet))
        os.makedirs(os.path.join(tmp, "text_encoder"))
        write_json("text_encoder/config.json", text_encoder_config(text_encoder))
        state = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in
                 params_to_state_dict(params["text_encoder"], prefix="text_model.").items()}
        save_file(state, os.path.join(tmp, "text_encoder", "model.safetensors"),
                  metadata={"format": "pt"})
        os.makedirs(os.path.join(tmp, "tokenizer"))
        write_json("tokenizer/vocab.json", {"words": list(vocabulary),
                                            "max_length": text_encoder.max_position_embeddings})
        os.makedirs(os.path.join(tmp, "scheduler"))
        write_json("scheduler/scheduler_config.json", scheduler_config(schedule))
        write_json(WORLD, world)
        write_manifest(tmp)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
