"""The embedded world: the README's main job.

Finetunes the small pixel-space text-to-image base that ships with prdp-jax (pretrained on clean
and degraded renders of captioned scenes, prdp_jax/world/base_model) with PRDP on the large prompt
set against the black-box preference reward (caption alignment and image quality), and evaluates
before and after on the small set, a sample of the large set, and held-out compositions never
seen in training or pretraining.

    python -m prdp_jax.main --config configs/world.py            # PRDP (default)
    python -m prdp_jax.main --config configs/world.py:ddpo       # DDPO, same world and budget
    python -m prdp_jax.main --config configs/world.py:tiny       # a seconds-long smoke run

The `model.unet`, `model.text_encoder`, `schedule` and `pretrain` fields describe how
`python -m prdp_jax.world.pretrain` makes a base; a run reads its model and schedule from the
base folder itself (`world.base_dir`).
"""
from prdp_jax.config import base_config
from prdp_jax.infra.errors import ConfigError
from prdp_jax.world.config import add_world_sections

RECIPES = ("prdp", "ddpo", "tiny")


def get_config(recipe: str = "prdp"):
    recipe = recipe or "prdp"
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r} for world; known: {', '.join(RECIPES)}")
    c = add_world_sections(base_config())
    c.method = "ddpo" if recipe == "ddpo" else "prdp"
    c.model.source = "world"
    c.model.unet.update(dict(
        sample_size=24, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, num_attention_heads=4, cross_attention_dim=64, norm_num_groups=8))
    c.model.text_encoder.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=24))
    # DDPM's linear schedule for small pixel-space images, sampled from t = 999, with v-prediction.
    # With SD's scaled-linear schedule the image mean leaks through the noise at the start of
    # sampling and a from-scratch base ignores background words (every sample comes out grey); with
    # epsilon-prediction, knowing the clean image at high noise barely lowers the loss, and in a
    # 10-minute pretraining the base ignores the caption entirely. v-prediction fixes both.
    c.schedule.beta_start = 1e-4
    c.schedule.beta_end = 0.02
    c.schedule.beta_schedule = "linear"
    c.schedule.timestep_spacing = "trailing"
    c.schedule.prediction_type = "v_prediction"
    c.sample.num_steps = 10
    c.sample.guidance_scale = 5.0
    # The last step (t=99 -> 0) is the clean prediction, not a policy step: as a Gaussian step its
    # sigma is ~0.01, so its log-ratio dwarfs the other nine (drift ~14 vs ~0.001) and its
    # gradient, not the steps that place and colour the objects, drives every update.
    c.sample.final_step = "deterministic"
    c.prompts.train = "world_large"
    c.reward.weights = {"preference": 1.0}
    # Evaluation: 32 small-set prompts, 512 unseen captions of the training distribution and 512
    # held-out compositions, 2 fixed-seed samples each (for the same number of images, more
    # prompts give a smaller paired standard error than more samples a prompt); the drift on
    # the first 32 prompts of each set (it costs a scoring pass). About 1.5 minutes before and
    # after, on 2 cores.
    c.world.large_sample_prompts = 512
    c.world.heldout_prompts = 512
    c.eval.sets = ("world_small", "world_large_sample", "world_heldout")
    c.eval.samples_per_prompt = 2
    c.eval.batch_size = 16                 # ~16 rows a core: the fastest UNet calls on a CPU
    c.eval.drift_prompts = 32
    # 8 images of each of 8 captions an epoch (28 pairs a caption, 224 an epoch; 16 x 4 gives
    # 96 for the same 64 reward queries), 4 AdamW steps of 2 captions each.
    c.train.epochs = 16
    c.train.prompts_per_epoch = 8
    c.train.images_per_prompt = 8
    c.train.passes_per_epoch = 1
    c.train.prompts_per_minibatch = 2
    # Each minibatch's gradient in one pass (no second forward; ~1.2 GB of activations), over
    # tiles of 16 trajectories x 3 steps (3 copies of the model in the compiled step: smaller
    # tiles run a little faster but compile for longer). Sampling in batches of 16 trajectories:
    # on a CPU a UNet call is fastest at ~16 rows a core (benchmarks/NOTES.md).
    c.train.gradient = "one_pass"
    c.train.microbatch_trajectories = 16
    c.train.microbatch_steps = 3
    c.train.score_microbatch_steps = 1     # the reference's scoring: 16 x 1 x CFG rows a call
    c.sample.batch_size = 16
    # Full-UNet updates lower the reward at every rate tried (2e-5..2e-4): with 32 trajectories
    # per step the policy gradient is mostly noise, and noise along output-sensitive directions
    # degrades the denoiser. Cross-attention only (7% of the UNet) keeps it intact.
    c.train.trainable = "attn2"
    c.train.learning_rate = 1e-4
    # The sampler's own log-probs match a re-score to ~4e-6, far inside the clip (1e-2).
    c.train.rescore_old = False
    c.prdp.beta = 1e-2
    c.prdp.clip_eps = 1e-2
    c.ddpo.clip_range = 1e-2
    c.ddpo.min_count = 4
    c.log.grid_every_epochs = 4
    c.pretrain.steps = 3000                # the shipped base: ~30 minutes on 2 CPU cores
    c.pretrain.learning_rate = 2e-3
    c.pretrain.ema_decay = 0.995
    if recipe == "tiny":
        tiny(c)
    return c


def tiny(c):
    """Every code path of the world in seconds (smoke tests, experiments --quick): a tiny model,
    a few pretraining steps, small splits, 4 sampling steps. Its base caches separately."""
    c.world.base_dir = "~/.cache/prdp_jax/world_base_tiny"
    c.world.pretrain_missing = True
    c.world.small_prompts, c.world.large_prompts = 8, 64
    c.world.large_sample_prompts, c.world.heldout_prompts = 4, 4
    c.model.unet.update(dict(
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), num_attention_heads=2,
        cross_attention_dim=16))
    c.model.text_encoder.update(dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2))
    c.sample.num_steps = 4
    c.sample.guidance_scale = 2.0
    c.pretrain.steps, c.pretrain.batch_size = 6, 8
    c.eval.samples_per_prompt, c.eval.batch_size, c.eval.max_prompts = 2, 8, 4
    c.train.epochs = 2
    c.train.prompts_per_epoch, c.train.images_per_prompt = 4, 4
    c.train.prompts_per_minibatch = 2
    c.train.microbatch_trajectories, c.train.microbatch_steps = 4, 3
    c.train.learning_rate = 1e-3
    c.log.grid_every_epochs = 1000
