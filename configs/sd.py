"""PRDP (and DDPO) on Stable Diffusion from local weights: the paper's Table 4 recipes.

Needs a GPU or TPU: every recipe is sized for an accelerator (see HARDWARE). Loading a recipe needs
no weights; running it needs the SD folder, the reward checkpoints and the prompt files on disk:

    python -m prdp_jax.main --config configs/sd.py:small_hpsv2 \\
        --config.model.path=/data/stable-diffusion-v1-4 \\
        --config.reward.hpsv2.checkpoint=/data/HPS_v2_compressed.pt ...

Recipes (RECIPES below), each with a DDPO baseline `ddpo_<recipe>` on the same reward budget
(512 reward queries per epoch: N prompts x B images):
  small_hpsv2, small_pickscore   45 animal prompts, 100 epochs, K=10 (Table 4, small scale)
  large_hpsv2, large_pickscore   HPDv2 train prompts, 1000 epochs, K=1 (Table 4, large scale)
  large_multi                    PickScore x10 + HPSv2 x2 + aesthetic x0.05 (Table 4, multi-reward)
  aesthetic_beta0.1|1|10         the aesthetic-reward beta sweep (§4.4: 250 epochs, bare animal
                                 names; HPSv2/PickScore logged alongside)
Every value the paper states, with its section and our deliberate differences: docs/recipes.md
(checked by tests/test_paper_recipes.py).
Any other beta: `--config.prdp.beta=...` on any recipe.
"""

from prdp_jax.config import base_config
from prdp_jax.infra.errors import ConfigError

# Rough, unmeasured estimates (UNet forward-equivalents per epoch x ~2 ms per bf16 SD 1.x forward
# at 512 px on an H100): sampling 51k, re-scoring 102k, each update pass ~205k.
HARDWARE = {
    "small": "8x A100/H100 80GB or a TPU v4-32 (about 10 min/epoch on 8x H100, ~17 h for 100 "
             "epochs); one 80GB GPU works with the same config, 8x slower",
    "large": "8x A100/H100 80GB or a TPU v4-32 (about 1.5 min/epoch on 8x H100, ~25 h for 1000 "
             "epochs)",
}
BASE = ("small_hpsv2", "small_pickscore", "large_hpsv2", "large_pickscore", "large_multi",
        "aesthetic_beta0.1", "aesthetic_beta1", "aesthetic_beta10")
RECIPES = BASE + tuple(f"ddpo_{r}" for r in BASE if not r.startswith("aesthetic")) + ("ddpo_aesthetic",)
LARGE_EVAL_SETS = ("hpdv2_train_seen500", "pickapic_v1_test", "hpdv2_anime", "hpdv2_concept_art",
                   "hpdv2_paintings", "hpdv2_photo")


def get_config(recipe: str = "small_hpsv2"):
    recipe = recipe or "small_hpsv2"
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r} for sd; known: {', '.join(RECIPES)}")
    ddpo = recipe.startswith("ddpo_")
    task = recipe[len("ddpo_"):] if ddpo else recipe
    scale = "large" if task.startswith("large") else "small"   # the aesthetic sweep: small scale
    c = base_config()
    c.method = "ddpo" if ddpo else "prdp"
    c.hardware = HARDWARE[scale]       # Expected hardware (informational; nothing reads it).

    # ---- Model: Stable Diffusion v1.4 from a local diffusers folder ----
    c.model.source = "diffusers"
    c.model.path = ""                  # Set to the folder holding model_index.json (SD 1.4 in the paper).
    c.model.resolution = 0             # 0 = the UNet's native size (512 px for SD 1.x).
    c.model.dtype = "bfloat16"         # The sampler's activations: bf16 (log-probs in float32).
    c.model.score_dtype = "float32"    # Every pass that scores stored transitions (theta_old,
                                       # the reference, the update) in float32: bf16 rounding
                                       # moves a per-step log-ratio far past the paper's clip eps
                                       # (docs/stable_diffusion.md#precision, docs/precision.md).
    c.model.param_dtype = "float32"    # float32 master weights (bf16 would round away lr-1e-5 updates).
    c.model.remat = True               # Rematerialise UNet blocks: backward memory per tile.
    c.model.attention_chunk = 1024     # Attention 1024 queries at a time: the 4096-token layers'
                                       # logits take a quarter of the memory (docs/memory_plan.md).

    # ---- Sampling: DDPM 50 steps, CFG 5 (paper) ----
    c.sample.num_steps = 50
    c.sample.eta = 1.0
    c.sample.guidance_scale = 5.0
    c.sample.batch_size = 64           # Trajectories per sampler call (bounds sampler + VAE memory).

    # ---- Training: Table 4 ----
    t = c.train
    t.images_per_prompt = 16 if scale == "small" else 8           # B
    t.prompts_per_epoch = 512 // t.images_per_prompt              # N: 512 reward queries per epoch
    t.epochs = 100 if scale == "small" else 1000                  # E
    aesthetic = task.startswith("aesthetic")
    if aesthetic:
        t.epochs = 250                 # §4.4: the KL study runs 250 epochs.
    t.weight_decay = 1e-4
    t.max_grad_norm = 1.0
    t.rescore_old = True               # theta_old's log-probs from the float32 scorer, not the
                                       # bf16 sampler: at theta = theta_old the clip sees exactly 0.
    t.microbatch_trajectories = 8      # Gradient tile: 8 trajectories (a multiple of the devices)
    t.microbatch_steps = 2             #   x 2 steps = 16 transitions (x2 for CFG) per backward.
    if scale == "small":
        t.passes_per_epoch = 10        # K = 10 updates: one minibatch of all 32 prompts per pass.
        t.prompts_per_minibatch = 32
        t.learning_rate = 1e-5
        c.prdp.beta, c.prdp.clip_eps = 3e-5, 1e-6
        c.prompts.train = "animals"    # "a painting of a <animal>", 45 animals.
        if aesthetic:
            c.prompts.train = "animal_names"   # §4.4: the bare animal names.
        c.eval.sets = (c.prompts.train,)
        c.eval.samples_per_prompt = 256  # App. C (45 x 256 = 11,520 images; docs/recipes.md).
    else:
        t.passes_per_epoch = 1         # K = 1 pass in 4 minibatches: the clip binds from step 2.
        t.prompts_per_minibatch = 16
        t.learning_rate = 1e-5 if task == "large_multi" else 7e-6
        c.prdp.beta = 3e-5 if task == "large_multi" else 3e-6
        c.prdp.clip_eps = 1e-4
        c.prompts.train = "hpdv2_train"  # Needs --config.prompts.files.hpdv2_train=.../train.json
        if task == "large_multi":        # App. D: Pick-a-Pic v1's training prompts.
            c.prompts.train = "pickapic_v1_train"
        c.eval.sets = LARGE_EVAL_SETS    # Seen prompts, Pick-a-Pic test, HPDv2 benchmark styles.
        c.eval.samples_per_prompt = 64   # App. C: 4,200 prompts x 64 = 268,800 images an
                                         # evaluation (~2 h on 8 H100s; docs/recipes.md).
        c.eval.max_prompts = 0           # All: 500 seen, 500 Pick-a-Pic test, 800 a style.
    c.eval.batch_size = 64
    c.eval.drift_prompts = 100         # The drift's extra scoring pass on 100 prompts of a set.

    # ---- Reward ----
    if task.endswith("hpsv2"):
        c.reward.weights = {"hpsv2": 1.0}
    elif task.endswith("pickscore"):
        c.reward.weights = {"pickscore": 1.0}
    elif task == "large_multi":
        c.reward.weights = {"pickscore": 10.0, "hpsv2": 2.0, "aesthetic": 0.05}
    else:  # aesthetic sweep: HPSv2 and PickScore at weight 0 are logged (text alignment) only.
        c.reward.weights = {"aesthetic": 1.0, "hpsv2": 0.0, "pickscore": 0.0}
        if not ddpo:
            c.prdp.beta = float(task[len("aesthetic_beta"):])  # beta in {0.1, 1, 10} (paper)

    # ---- DDPO baseline: same prompts, images, epochs and learning rate ----
    if ddpo:
        t.passes_per_epoch = 1         # One pass in 4 minibatches (DDPO's inner epoch).
        t.prompts_per_minibatch = t.prompts_per_epoch // 4
        c.ddpo.clip_range = 1e-4
        c.ddpo.adv_clip_max = 5.0
        c.ddpo.normalization = "per_prompt"
        c.ddpo.buffer_size = 32
        c.ddpo.min_count = 16

    c.mesh.data = -1                   # Data parallel over every device.
    c.checkpoint.every_epochs = 1 if scale == "small" else 10
    c.log.grid_every_epochs = 10 if scale == "small" else 50
    return c
