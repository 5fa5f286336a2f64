"""Test setup: 8 host CPU devices (for sharding tests), a persistent compilation cache, and small
configs that go through exactly the code paths of the real ones."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

from prdp_jax import config as config_lib  # noqa: E402
from prdp_jax import plugins  # noqa: E402,F401  (registers the built-in plugins, as entry points do)
from prdp_jax.infra import runtime  # noqa: E402

CACHE = os.path.expanduser(os.environ.get("PRDP_TEST_XLA_CACHE", "~/.cache/prdp_jax/pytest-xla"))
runtime.enable_compilation_cache(CACHE)
jax.config.update("jax_default_matmul_precision", "highest")

TINY_UNET = dict(
    sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
    num_attention_heads=2, cross_attention_dim=16, norm_num_groups=8)


def tiny_config(method: str = "prdp", **overrides):
    """A seconds-per-epoch config: 8x8 pixels, 4 steps, 4 prompts x 4 images, 1 device."""
    from prdp_jax.config import base_config
    c = base_config()
    c.method = method
    c.prompts.train = "animal_names"
    c.model.unet.update(TINY_UNET)
    c.model.text_encoder.update(dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=4))
    c.sample.num_steps = 4
    c.sample.guidance_scale = 2.0
    c.train.epochs = 2
    c.train.prompts_per_epoch = 4
    c.train.images_per_prompt = 4
    c.train.passes_per_epoch = 2
    c.train.prompts_per_minibatch = 2
    c.train.microbatch_trajectories = 4
    c.train.microbatch_steps = 3
    c.train.learning_rate = 1e-3
    c.prdp.beta = 1e-3
    c.prdp.clip_eps = 1e-2
    c.ddpo.clip_range = 1e-2
    c.ddpo.min_count = 2
    c.mesh.devices = 1
    c.log.progress = False
    c.log.compile_cache = CACHE
    c.log.grid_every_epochs = 1000
    return override(c, **overrides)


def override(c, **overrides):
    """Sets dotted fields: override(c, **{"train.epochs": 3})."""
    for key, value in overrides.items():
        config_lib.set_field(c, key, value)
    return c


@pytest.fixture
def config_factory():
    return tiny_config
