"""Pretrains the world's base model and writes it as a verified diffusers-style folder.

    python -m prdp_jax.world.pretrain --out DIR [--config configs/world.py[:recipe]] [--state DIR]
                                      [--config.pretrain.steps=N ...]

The pretraining state is saved to `--state` (default: DIR.state) every `pretrain.checkpoint_every`
steps; rerunning the same command resumes where it stopped, so a long pretraining can run in
several sittings. The folder that ships with prdp-jax (prdp_jax/world/base_model) was made with
`--out prdp_jax/world/base_model` and the default config.
"""
from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from prdp_jax.infra.cli import fail, parse_flags, run_command

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
    "world.py"), "World config file, optionally ':recipe'.", lock_config=True)
flags.DEFINE_string("out", None, "Folder to write the base into (replaced if it exists).")
flags.DEFINE_string("state", None, "Resumable pretraining state (default: <out>.state).")


def main(argv) -> None:
    from prdp_jax.infra import runtime
    from prdp_jax.infra.errors import UserError
    from prdp_jax.world import base
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.out:
        fail("--out is required: the folder to write the base into")
    logging.set_verbosity(logging.WARNING)
    out = os.path.abspath(os.path.expanduser(FLAGS.out))
    try:
        runtime.setup(FLAGS.config)
        base.pretrain_base(FLAGS.config, out, FLAGS.state or out + ".state",
                           show_progress=bool(FLAGS.config.log.progress))
    except UserError as e:
        fail(str(e))


if __name__ == "__main__":
    run_command(app.run, main, flags_parser=parse_flags)
