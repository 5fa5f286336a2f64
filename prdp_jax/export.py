"""Writes a finetuned UNet from a training run back out as a diffusers folder.

    python -m prdp_jax.export --workdir RUN --out DIR [--epoch N] [--full] [--dtype float16]

`DIR/unet/` gets `config.json` and `diffusion_pytorch_model.safetensors`, loadable with diffusers'
`UNet2DConditionModel.from_pretrained(DIR/unet)`. With `--full` (runs on `model.source="diffusers"`),
DIR becomes a whole pipeline folder: every other component is copied unchanged from the run's
source folder, so `StableDiffusionPipeline.from_pretrained(DIR)` works. Everything is written into a
temporary folder beside DIR and renamed into place at the end; an existing DIR is never touched.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from prdp_jax.infra import files
from prdp_jax.infra.cli import fail, run_command
from prdp_jax.infra.errors import CheckpointError, ConfigError, UserError

UNET_DIR = "unet"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{workdir} is not a prdp-jax run directory (no config.json)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def unet_module(config: ml_collections.ConfigDict):
    """(our UNet module in float32, the source folder's unet config dict or None)."""
    if config.model.source == "diffusers":
        from prdp_jax.models import diffusers_folder
        folder = diffusers_folder.open_folder(config.model.path, variant=config.model.variant)
        source = files.read_json(os.path.join(folder.component(UNET_DIR), "config.json"))
        return folder.unet, source
    from prdp_jax.pipelines import base
    return base.unet_from_config(config).clone(dtype=jnp.float32, remat=False), None


def diffusers_unet_config(unet) -> dict:
    """A diffusers UNet2DConditionModel config for our UNet's fields (heads go under diffusers'
    historical name `attention_head_dim`)."""
    heads = unet.num_attention_heads
    cfg = {
        "_class_name": "UNet2DConditionModel", "sample_size": unet.sample_size,
        "in_channels": unet.in_channels, "out_channels": unet.out_channels,
        "block_out_channels": list(unet.block_out_channels),
        "down_block_types": list(unet.down_block_types), "up_block_types": list(unet.up_block_types),
        "layers_per_block": unet.layers_per_block,
        "attention_head_dim": list(heads) if isinstance(heads, (tuple, list)) else heads,
        "cross_attention_dim": unet.cross_attention_dim,
        "transformer_layers_per_block": unet.transformer_layers_per_block,
        "norm_num_groups": unet.norm_num_groups, "norm_eps": unet.norm_eps,
        "use_linear_projection": unet.use_linear_projection,
        "upcast_attention": unet.upcast_attention, "flip_sin_to_cos": unet.flip_sin_to_cos,
        "freq_shift": unet.freq_shift,
    }
    if unet.class_embed_type == "projection":
        cfg.update(class_embed_type="projection",
                   projection_class_embeddings_input_dim=unet.cross_attention_dim)
    return cfg


def checkpoint_epochs(workdir: str, epoch: Optional[int] = None) -> list[int]:
    """The saved epochs of a run (CheckpointError if it has none, or not `epoch`); reads no state."""
    read_run_config(workdir)
    directory = os.path.join(workdir, "checkpoints")
    epochs = sorted(int(e) for e in os.listdir(directory) if e.isdigit()) \
        if os.path.isdir(directory) else []
    if not epochs:
        raise CheckpointError(f"{workdir} has no checkpoint to evaluate or export (no "
                              f"checkpoints/<epoch>/); train it first")
    if epoch is not None and epoch not in epochs:
        raise CheckpointError(f"{directory} has no checkpoint for epoch {epoch}; it has {epochs}")
    return epochs


def restore_unet_params(workdir: str, epoch: Optional[int] = None) -> tuple[Any, int, Any, Any]:
    """Restores the trainable UNet params of a run's checkpoint onto one device.

    Returns:
      (params as numpy arrays, the epoch, the UNet module, the source unet config or None).
    """
    from prdp_jax import config as config_lib
    from prdp_jax.infra import sharding
    from prdp_jax.training import checkpoint as ckpt_lib
    from prdp_jax.training import state as train
    config = read_run_config(workdir)
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise CheckpointError(f"{workdir} has no checkpoints/ to export")
    unet, source_cfg = unet_module(config)
    param_dtype = jnp.dtype(config.model.get("param_dtype", "float32"))
    size, ch, dim = unet.sample_size, unet.in_channels, unet.cross_attention_dim
    abstract = jax.eval_shape(lambda: unet.clone(param_dtype=param_dtype).init(
        jax.random.key(0), jnp.zeros((1, size, size, ch)), jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, 1, dim)))["params"])
    repl = sharding.replicated(sharding.make_mesh({}, jax.devices()[:1]))
    with_sharding = lambda tree: jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), tree)
    opt = jax.eval_shape(train.make_optimizer(config).init, abstract)
    state = train.TrainState(params=with_sharding(abstract), opt_state=with_sharding(opt),
                             key=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl))
    checkpointer = ckpt_lib.Checkpointer(directory, 1, config_lib.fingerprint(config))
    try:
        available = sorted(checkpointer.manager.all_steps())
        if not available:
            raise CheckpointError(f"{directory} holds no checkpoint")
        epoch = available[-1] if epoch is None else int(epoch)
        if epoch not in available:
            raise CheckpointError(f"{directory} has no checkpoint for epoch {epoch}; it has "
                                  f"{available}")
        restored, _ = checkpointer.restore(epoch, state)
    finally:
        checkpointer.manager.close()
    return jax.tree.map(np.asarray, restored.params), epoch, unet, source_cfg


def write_unet(directory: str, params: Any, unet_config: dict, dtype=np.float32) -> None:
    """unet_config -> directory/config.json, params -> directory/diffusion_pytorch_model.safetensors."""
    from safetensors.numpy import save_file

    from prdp_jax.models.convert import params_to_state_dict
    os.makedirs(directory)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(unet_config, f, indent=2, sort_keys=True)
    state = {k: np.ascontiguousarray(v.astype(dtype)) for k, v in params_to_state_dict(params).items()}
    save_file(state, os.path.join(directory, WEIGHTS), metadata={"format": "pt"})


def export(workdir: str, out: str, epoch: Optional[int] = None, full: bool = False,
           dtype: str = "float32", log=print) -> str:
    """Exports a run's UNet (and with `full` the rest of its source pipeline) to `out`; returns out."""
    if dtype not in ("float32", "float16"):
        raise ConfigError(f"--dtype must be float32 or float16, got {dtype!r}")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out):
        raise ConfigError(f"--out {out} already exists; choose a new folder")
    params, epoch, unet, source_cfg = restore_unet_params(workdir, epoch)
    config = read_run_config(workdir)
    if full and config.model.source != "diffusers":
        raise ConfigError("--full copies the source pipeline folder, so it needs a run with "
                          "model.source='diffusers'")
    unet_cfg = dict(source_cfg) if source_cfg is not None else diffusers_unet_config(unet)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        if full:
            source = os.path.abspath(os.path.expanduser(config.model.path))
            for name in sorted(os.listdir(source)):
                if name == UNET_DIR:
                    continue
                src, dst = os.path.join(source, name), os.path.join(tmp, name)
                (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, dst)
        write_unet(os.path.join(tmp, UNET_DIR), params, unet_cfg, np.dtype(dtype))
        os.rename(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"cannot write {out} ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"exported epoch {epoch} of {workdir} to {out}" + (" (full pipeline)" if full else ""))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m prdp_jax.export", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="the training run's work directory")
    parser.add_argument("--out", required=True, help="new folder to write (must not exist)")
    parser.add_argument("--epoch", type=int, default=None, help="checkpoint epoch (default: latest)")
    parser.add_argument("--full", action="store_true",
                        help="write a whole pipeline folder (copies the run's source folder)")
    parser.add_argument("--dtype", default="float32", help="float32 (default) or float16 weights")
    args = parser.parse_args(argv)
    try:
        export(args.workdir, args.out, args.epoch, args.full, args.dtype)
    except UserError as e:
        fail(str(e))


if __name__ == "__main__":
    run_command(main)
