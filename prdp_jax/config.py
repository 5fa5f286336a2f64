"""Base configuration: every field the trainer reads, with its default and meaning.

Config files under `configs/` start from `base_config()` and override what they need; each has one
`get_config(recipe)`. Any field can be overridden on the command line: `--config.train.epochs=5`.
`validate` refuses impossible combinations with one clear line, before anything is compiled.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import types

import ml_collections

from prdp_jax.infra.errors import ConfigError

METHODS = ("prdp", "ddpo")
GRADIENTS = ("tiled", "one_pass")
SAMPLING = ("online", "offline")
FALLBACKS = ("none", "previous")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0                      # Seeds parameter init, prompt order, sampling noise, shuffles.
    c.method = "prdp"               # "prdp" (reward difference prediction) or "ddpo" (PPO baseline).

    # ---- Model ----
    c.model = m = ml_collections.ConfigDict()
    m.source = "random"             # "random": fresh init from model.init_seed (reference = init);
                                    # "world": the embedded world's base; "diffusers": model.path.
    m.init_seed = 0                 # Seed of the random init (reference and trainable start).
    m.dtype = "float32"             # Activation dtype of the UNet ("float32" or "bfloat16").
    m.score_dtype = ""              # Activation dtype of the UNet where it scores stored
                                    # transitions (theta_old's re-score, the reference, the
                                    # update's forward and gradient); "" = model.dtype. bf16
                                    # rounding moves a per-step log-ratio by far more than the
                                    # paper's clip eps: docs/stable_diffusion.md#precision.
    m.param_dtype = "float32"       # Stored dtype of every model weight, trainable and frozen
                                    # ("float32" or "bfloat16"). AdamW moments and the gradient
                                    # accumulator stay float32; bf16 trainable weights round away
                                    # updates below ~2^-9 of a weight (lr 1e-5 is mostly below).
    m.path = ""                     # "diffusers" source: local diffusers pipeline folder (SD 1.x/2.x).
    m.resolution = 0                # "diffusers": image side in pixels; 0 = UNet sample_size x VAE
                                    # downscale (512 for SD 1.x and 2.x-base, 768 for SD 2.x-v).
    m.variant = ""                  # "diffusers": weight files to read: "" = full precision, else
                                    # the .fp16. variant if only that exists; "fp16" = fp16 variant.
    m.schedule_from_folder = True   # "diffusers": take `schedule` from scheduler_config.json.
    m.remat = False                 # Rematerialise UNet blocks in the backward pass (saves memory).
    m.attention_chunk = 0           # UNet attention takes at most this many queries at a time
                                    # (0 = all): bounds the [queries, keys] logits (SD 1.x at 512
                                    # px has 4096 tokens at 64x64; 1024 cuts them 4x). Same result.
    m.tokenizer = "word"            # "word": closed vocabulary of the prompt sets.
    m.unet = ml_collections.ConfigDict(dict(   # Fields of diffusers' UNet2DConditionModel config.
        sample_size=16,                        # Latent (here pixel) height and width.
        in_channels=3,                         # Latent channels in.
        out_channels=3,                        # Predicted channels out.
        block_out_channels=(32, 64),           # Channels per resolution level.
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),  # One per level.
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),        # One per level, reversed.
        layers_per_block=1,                    # Resnets per down block (up blocks get one more).
        num_attention_heads=4,                 # Heads per level (int or tuple).
        cross_attention_dim=32,                # Text embedding width; equals text hidden_size.
        transformer_layers_per_block=1,        # Transformer blocks per attention layer.
        norm_num_groups=8,                     # GroupNorm groups.
        norm_eps=1e-5,                         # GroupNorm epsilon in resnets and the output norm.
        use_linear_projection=False,           # Linear (SD 2.x) instead of 1x1 conv proj_in/out.
        upcast_attention=False,                # Attention in float32 under bf16 (SD 2.1).
        flip_sin_to_cos=True,                  # Timestep features as [cos, sin].
        freq_shift=0.0,                        # Timestep feature frequency shift.
    ))
    m.text_encoder = ml_collections.ConfigDict(dict(  # Fields of transformers' CLIPTextConfig.
        vocab_size=-1,                         # -1: the word tokenizer's vocabulary size.
        hidden_size=32,                        # Width; must equal unet.cross_attention_dim.
        intermediate_size=64,                  # MLP width.
        num_hidden_layers=2,                   # Encoder layers.
        num_attention_heads=4,                 # Attention heads.
        max_position_embeddings=16,            # Longest token sequence (BOS/EOS included).
        hidden_act="quick_gelu",               # "quick_gelu" (OpenAI CLIP) or "gelu".
        layer_norm_eps=1e-5,                   # LayerNorm epsilon.
        eos_token_id=1,                        # Pooling position: first EOS (word tokenizer: 1).
    ))

    # ---- Noise schedule (diffusers scheduler config semantics) ----
    c.schedule = s = ml_collections.ConfigDict()
    s.num_train_timesteps = 1000    # Training timesteps of the base model.
    s.beta_start = 0.00085          # First beta.
    s.beta_end = 0.012              # Last beta.
    s.beta_schedule = "scaled_linear"  # "scaled_linear" (Stable Diffusion) or "linear".
    s.steps_offset = 1              # Offset added to "leading" inference timesteps.
    s.set_alpha_to_one = False      # Last step's alpha-bar: 1 (zero variance) or alphas_cumprod[0].
    s.timestep_spacing = "leading"  # "leading", "trailing" or "linspace".
    s.prediction_type = "epsilon"   # "epsilon" or "v_prediction".

    # ---- Sampling (the policy) ----
    c.sample = ml_collections.ConfigDict()
    c.sample.num_steps = 50         # Denoising steps T (paper: 50).
    c.sample.eta = 1.0              # DDIM eta; 1.0 is DDPM ancestral sampling (paper).
    c.sample.final_step = "stochastic"  # "stochastic" (paper): the last step is a policy step with a
                                    # log-prob; "deterministic": it outputs the clean prediction
                                    # x0, noise-free and outside the policy (short chains: see
                                    # diffusion.step_coefficients).
    c.sample.guidance_scale = 5.0   # Classifier-free guidance scale (paper: 5.0).
    c.sample.batch_size = 0         # Trajectories per sampler call; 0 = all of an epoch at once.
    c.sample.logprob_reduction = "mean"  # Per-step log-prob over latent elements: "mean" or "sum".

    # ---- Prompts ----
    c.prompts = ml_collections.ConfigDict()
    c.prompts.train = "animals"     # Prompt set for training: a registered name (prdp_jax.prompts),
                                    # a file preset below, or "file:PATH[#FIELD]" (prompts/files.py).
    c.prompts.field = ""            # Key/column of the prompt in "file:PATH" sets without "#FIELD".
    c.prompts.files = ml_collections.ConfigDict(dict(  # Paths of downloaded prompt files, per preset.
        hpdv2_train="",             # HPDv2 train.json (list of {prompt, ...}); also hpdv2_train_seen500.
        hpdv2_anime="",             # HPDv2 benchmark/anime.json (list of 800 strings).
        hpdv2_concept_art="",       # HPDv2 benchmark/concept-art.json.
        hpdv2_paintings="",         # HPDv2 benchmark/paintings.json.
        hpdv2_photo="",             # HPDv2 benchmark/photo.json.
        pickapic_v1_train="",       # Pick-a-Pic v1 train parquet shard(s): file, folder or glob.
        pickapic_v1_test="",        # Pick-a-Pic v1 test (or test_unique) parquet shard(s).
    ))

    # ---- Reward ----
    c.reward = ml_collections.ConfigDict()
    c.reward.weights = ml_collections.ConfigDict({"jpeg_compressibility": 1.0})  # name -> weight.
    # Model rewards (prdp_jax/rewards/{aesthetic,pickscore,hpsv2,clipscore}.py); local paths only.
    # The paper's mix is reward.weights = {"pickscore": 10, "hpsv2": 2, "aesthetic": 0.05}.
    c.reward.aesthetic = ml_collections.ConfigDict(dict(
        clip_path="",         # transformers folder of openai/clip-vit-large-patch14 (vision tower).
        mlp_path="",          # sac+logos+ava1-l14-linearMSE.pth (or a .safetensors copy).
    ))
    c.reward.pickscore = ml_collections.ConfigDict(dict(
        path="",              # transformers folder of yuvalkirstain/PickScore_v1 (+ tokenizer files).
        tokenizer_path="",    # Folder with the CLIP tokenizer files; "" = the same as path.
    ))
    c.reward.hpsv2 = ml_collections.ConfigDict(dict(
        checkpoint="",        # HPS_v2_compressed.pt or HPS_v2.1_compressed.pt.
        tokenizer_path="",    # Folder with the CLIP tokenizer files (vocab.json + merges.txt).
        version="v2.0",       # "v2.0" or "v2.1" (same architecture).
        model="ViT-H-14",     # open_clip architecture name, or an open_clip model-config .json.
    ))
    c.reward.clipscore = ml_collections.ConfigDict(dict(
        path="",              # transformers CLIP folder (e.g. openai/clip-vit-base-patch32).
    ))

    # ---- Training (Algorithm 1) ----
    c.train = t = ml_collections.ConfigDict()
    t.epochs = 100                  # Epochs E: each samples fresh trajectories from a snapshot.
    t.prompts_per_epoch = 32        # Prompts N sampled per epoch.
    t.images_per_prompt = 16        # Trajectories B per prompt (PRDP needs >= 2).
    t.passes_per_epoch = 10         # K passes over the epoch's samples (paper's K updates).
    t.prompts_per_minibatch = 32    # Prompts per optimiser step; N / this = steps per pass. With
                                    # several minibatches the clip binds from the second step on.
    t.microbatch_trajectories = 8   # Trajectories per gradient tile (memory, not maths).
    t.microbatch_steps = 10         # Steps per gradient tile (memory, not maths).
    t.score_microbatch_steps = 0    # Steps per tile of the forward-only scoring passes (log
                                    # pi_ref, the tiled gradient's scoring): 0 = microbatch_steps.
                                    # They keep no activations; on a CPU small tiles run fastest.
    t.gradient = "tiled"            # How a minibatch's exact gradient is taken (same maths):
                                    # "tiled": score every transition (forward), the loss, then
                                    # each tile's forward and backward: memory of one tile;
                                    # "one_pass": every tile's forward once, activations kept,
                                    # then the backward: no second forward (the world's update
                                    # is ~1/3 faster), memory of the whole minibatch.
    t.learning_rate = 1e-5          # AdamW learning rate (constant).
    t.weight_decay = 1e-4           # AdamW decoupled weight decay.
    t.adam_b1 = 0.9                 # AdamW beta1.
    t.adam_b2 = 0.999               # AdamW beta2.
    t.adam_eps = 1e-8               # AdamW epsilon.
    t.max_grad_norm = 1.0           # Global-norm gradient clip.
    t.trainable = ""                # Regex over UNet param paths ('/'-joined, e.g.
                                    # 'down_blocks_1/attentions_0/.../attn2/to_k/kernel'): only
                                    # matching params are finetuned (searched, not anchored); the
                                    # rest stay at the base and get no optimiser state nor
                                    # gradient (their backward pass is skipped: the world's
                                    # cross-attention-only update is 31% faster). "" = all (the
                                    # paper's full finetune).
    t.rescore_old = True            # Score theta_old's log-probs with the update's own scorer
                                    # (one extra forward pass per epoch), so the first update is
                                    # exactly on-policy and the clip window is exact; False uses
                                    # the sampler's log-probs, which differ by float rounding
                                    # (~1e-6: as large as the paper's small-scale clip eps 1e-6).
    t.sampling = "online"           # "online": each epoch samples from the snapshot theta_old
                                    # (Algorithm 1); "offline": from the frozen reference (the
                                    # paper's offline RDP ablation), same prompts and budget.

    # ---- PRDP ----
    c.prdp = p = ml_collections.ConfigDict()
    p.beta = 3e-5                   # KL coefficient; the regression target is reward difference / beta.
    p.clip_eps = 1e-6               # Per-step clip of log pi_theta / pi_theta_old (inf = off).
    p.step_reduction = "mean"       # Trajectory log-ratio over steps: "mean" (paper code) or "sum".

    # ---- DDPO ----
    c.ddpo = d = ml_collections.ConfigDict()
    d.clip_range = 1e-4             # PPO ratio clip (inf = off).
    d.adv_clip_max = 5.0            # Advantages clipped to +-this.
    d.normalization = "per_prompt"  # "per_prompt" (stat tracker) or "batch".
    d.buffer_size = 32              # Stat tracker: rewards kept per prompt.
    d.min_count = 16                # Stat tracker: fewer than this -> batch mean/std.

    # ---- Mesh and sharding ----
    c.mesh = ml_collections.ConfigDict()
    c.mesh.devices = 0              # Devices to use: 0 = all (of all processes); N = the first N.
    c.mesh.data = -1                # Data-parallel axis size; -1 fills the remaining devices.
    c.mesh.fsdp = 1                 # Fully-sharded axis size (params/optimizer split over it).
    c.mesh.tensor = 1               # Tensor axis size (reserved; batch is not split over it).
    c.mesh.rules = ()               # 'regex=spec' param sharding rules, e.g. 'kernel$=-,-,-,fsdp'.
    c.mesh.fsdp_min_size = 2 ** 14  # Unmatched params smaller than this stay replicated.
    c.mesh.cpu_devices = 0          # CPU-only hosts: split the cores into this many devices (the
                                    # trainer then runs data-parallel over them; XLA:CPU gives each
                                    # convolution one thread). 0 = auto: the most (up to one per
                                    # core) that divide every batch, with the default mesh; 1 = one
                                    # device. XLA_FLAGS' --xla_force_host_platform_device_count wins.

    # ---- Multi-process runtime (one process per host; prdp_jax/infra/runtime.py) ----
    c.distributed = ml_collections.ConfigDict()
    c.distributed.mode = "auto"     # "auto": join a multi-process job when the environment names
                                    # one (JAX_COORDINATOR_ADDRESS, SLURM, Open MPI, Cloud TPU pod);
                                    # "on": always call jax.distributed.initialize(); "off": never.
    c.distributed.coordinator_address = ""  # "host:port" of process 0; "" = JAX_COORDINATOR_ADDRESS
                                    # or the cluster's own (SLURM, TPU).
    c.distributed.num_processes = -1  # Processes in the job; -1 = JAX_NUM_PROCESSES or the cluster's.
    c.distributed.process_id = -1   # This process's index; -1 = JAX_PROCESS_ID or the cluster's.
    c.distributed.timeout_s = 300   # Stop with an error if not every process joined by then.

    # ---- Evaluation (fixed seeds, before and after training) ----
    c.eval = e = ml_collections.ConfigDict()
    e.sets = ()                     # Prompt sets to evaluate (names as for prompts.train); () = none.
    e.samples_per_prompt = 4        # Images per prompt (sample j of prompt i has a fixed key).
    e.max_prompts = 0               # Evaluate only the first this many prompts of a set (0 = all).
    e.batch_size = 64               # Trajectories per evaluation sampler call.
    e.seed = 2024                   # Evaluation noise seed, shared by every method and run.
    e.shuffled_control = False      # Also score each image against another prompt's caption: a
                                    # caption-blind model scores the same on both.
    e.drift_prompts = 0             # Drift from the reference on only the first this many prompts
                                    # of a set (0 = all): it costs a scoring pass as long as the
                                    # sampling.
    e.every_epochs = 0              # Also evaluate every this many epochs (0 = before/after only);
                                    # results join that epoch's metrics row as eval/<set>/...

    # ---- Checkpoints, logging ----
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_epochs = 1   # Save every this many epochs (and at the end).
    c.checkpoint.max_to_keep = 3    # Checkpoints kept (>= 1).
    c.checkpoint.fallback = "none"  # A latest checkpoint that fails its checksums: "none" stops
                                    # with an error; "previous" resumes from the newest one that
                                    # passes (the corrupt one is moved to checkpoints_corrupt/).
    c.log = ml_collections.ConfigDict()
    c.log.grid_every_epochs = 10    # Save a captioned PNG grid of samples every this many epochs.
    c.log.grid_prompts = 4          # Prompts in the grid (rows).
    c.log.grid_images = 4           # Images per prompt in the grid (columns).
    c.log.progress = True           # tqdm progress bars.
    c.log.compile_cache = "~/.cache/prdp_jax/xla"  # Persistent XLA compilation cache ("" = off).
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    """Refuses impossible combinations that need no devices to detect."""
    if c.method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {c.method!r}")
    t = c.train
    for name in ("epochs", "prompts_per_epoch", "images_per_prompt", "passes_per_epoch",
                 "prompts_per_minibatch", "microbatch_trajectories", "microbatch_steps"):
        if int(t[name]) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {t[name]}")
    if int(t.score_microbatch_steps) < 0:
        raise ConfigError(f"train.score_microbatch_steps must be >= 0 (0: microbatch_steps), got "
                          f"{t.score_microbatch_steps}")
    if t.gradient not in GRADIENTS:
        raise ConfigError(f"train.gradient must be one of {GRADIENTS}, got {t.gradient!r}")
    if c.method == "prdp" and t.images_per_prompt < 2:
        raise ConfigError(f"PRDP compares trajectories of the same prompt: train.images_per_prompt "
                          f"must be >= 2, got {t.images_per_prompt}")
    if t.prompts_per_epoch % t.prompts_per_minibatch:
        raise ConfigError(f"train.prompts_per_minibatch={t.prompts_per_minibatch} must divide "
                          f"train.prompts_per_epoch={t.prompts_per_epoch}")
    total = t.prompts_per_epoch * t.images_per_prompt
    if c.sample.batch_size and total % c.sample.batch_size:
        raise ConfigError(f"sample.batch_size={c.sample.batch_size} must divide the "
                          f"{total} trajectories of an epoch (prompts_per_epoch x images_per_prompt)")
    for name, value in (("prdp.beta", c.prdp.beta), ("train.max_grad_norm", t.max_grad_norm),
                        ("train.adam_eps", t.adam_eps)):
        _finite(name, value, "> 0", value > 0)
    _finite("train.learning_rate", t.learning_rate, ">= 0 (0 keeps the model frozen)",
            t.learning_rate >= 0)
    _finite("train.weight_decay", t.weight_decay, ">= 0", t.weight_decay >= 0)
    _finite("sample.guidance_scale", c.sample.guidance_scale,
            ">= 0 (1 is no guidance, 0 the unconditional model)", c.sample.guidance_scale >= 0)
    for name, weight in dict(c.reward.weights).items():
        _finite(f"reward.weights.{name}", weight, "", True)
    if not c.prdp.clip_eps > 0:
        raise ConfigError(f"prdp.clip_eps must be > 0 (inf disables the clip), got {c.prdp.clip_eps}")
    if not c.ddpo.clip_range > 0:
        raise ConfigError(f"ddpo.clip_range must be > 0 (inf disables the clip), "
                          f"got {c.ddpo.clip_range}")
    try:
        re.compile(t.trainable)
    except re.error as e:
        raise ConfigError(f"train.trainable={t.trainable!r} is not a valid regex: {e}") from None
    if c.train.sampling not in SAMPLING:
        raise ConfigError(f"train.sampling must be one of {SAMPLING}, got {c.train.sampling!r}")
    if c.eval.drift_prompts < 0:
        raise ConfigError(f"eval.drift_prompts must be >= 0 (0 = all), got {c.eval.drift_prompts}")
    if c.eval.every_epochs < 0:
        raise ConfigError(f"eval.every_epochs must be >= 0, got {c.eval.every_epochs}")
    if c.prdp.step_reduction not in ("mean", "sum"):
        raise ConfigError(f"prdp.step_reduction must be 'mean' or 'sum', got {c.prdp.step_reduction!r}")
    if c.sample.logprob_reduction not in ("mean", "sum"):
        raise ConfigError(f"sample.logprob_reduction must be 'mean' or 'sum', "
                          f"got {c.sample.logprob_reduction!r}")
    if c.ddpo.normalization not in ("per_prompt", "batch"):
        raise ConfigError(f"ddpo.normalization must be 'per_prompt' or 'batch', "
                          f"got {c.ddpo.normalization!r}")
    if c.model.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.dtype must be 'float32' or 'bfloat16', got {c.model.dtype!r}")
    if c.model.score_dtype not in ("", "float32", "bfloat16"):
        raise ConfigError(f"model.score_dtype must be '', 'float32' or 'bfloat16', got "
                          f"{c.model.score_dtype!r}")
    if (c.model.score_dtype or c.model.dtype) != c.model.dtype and not t.rescore_old \
            and t.sampling == "online":
        raise ConfigError(f"model.score_dtype={c.model.score_dtype} differs from model.dtype="
                          f"{c.model.dtype}: set train.rescore_old=True, so that the clip's "
                          f"centre log pi_theta_old comes from the same scorer as the update")
    if c.model.param_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.param_dtype must be 'float32' or 'bfloat16', "
                          f"got {c.model.param_dtype!r}")
    if c.eval.sets and (c.eval.samples_per_prompt < 1 or c.eval.batch_size < 1):
        raise ConfigError("eval.samples_per_prompt and eval.batch_size must be >= 1")
    if c.mesh.devices < 0:
        raise ConfigError(f"mesh.devices must be 0 (all) or a positive count, got {c.mesh.devices}")
    if c.checkpoint.every_epochs < 1:
        raise ConfigError(f"checkpoint.every_epochs must be >= 1, got {c.checkpoint.every_epochs}")
    if c.checkpoint.max_to_keep < 1:
        raise ConfigError(f"checkpoint.max_to_keep must be >= 1 (the run resumes from its latest "
                          f"checkpoint), got {c.checkpoint.max_to_keep}")
    if c.checkpoint.fallback not in FALLBACKS:
        raise ConfigError(f"checkpoint.fallback must be one of {FALLBACKS}, "
                          f"got {c.checkpoint.fallback!r}")


def _finite(name: str, value, requirement: str, holds: bool) -> None:
    """Refuses a value that is not a finite number meeting `requirement`."""
    try:
        finite = math.isfinite(float(value))
    except (TypeError, ValueError):
        finite = False
    if not finite or not holds:
        raise ConfigError(f"{name} must be a finite number{' ' if requirement else ''}"
                          f"{requirement}, got {value!r}")


# The repository's configs/ folder (configs/<name>.py, each with one get_config(recipe)).
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_module(path: str) -> types.ModuleType:
    """The Python config file at `path`, imported as a module."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found")
    module_spec = importlib.util.spec_from_file_location(
        f"prdp_config_{os.path.splitext(os.path.basename(path))[0]}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"config file {path} line {e.lineno}: {e.msg}") from None
    return module


def load_file(spec: str) -> ml_collections.ConfigDict:
    """The config of `path/to/file.py[:recipe]` (the file's `get_config(recipe)`)."""
    path, _, recipe = spec.partition(":")
    module = load_module(path)
    return module.get_config(recipe) if recipe else module.get_config()


def load_named(name: str, recipe: str = "") -> ml_collections.ConfigDict:
    """The config of configs/<name>.py[:recipe] in the repository."""
    return load_file(os.path.join(CONFIG_DIR, f"{name}.py") + (f":{recipe}" if recipe else ""))


def get_field(config: ml_collections.ConfigDict, dotted: str):
    """The value of a dotted field such as 'train.learning_rate'."""
    node = config
    for part in dotted.split("."):
        if part not in node:
            raise ConfigError(f"{dotted!r} is not a config field")
        node = node[part]
    return node


def set_field(config: ml_collections.ConfigDict, dotted: str, value) -> ml_collections.ConfigDict:
    """Sets an existing dotted field (set_field(c, 'train.epochs', 3)); returns the config."""
    *parents, leaf = dotted.split(".")
    node = get_field(config, ".".join(parents)) if parents else config
    if leaf not in node:
        raise ConfigError(f"{dotted!r} is not a config field")
    node[leaf] = value
    return config


def to_json(c: ml_collections.ConfigDict) -> str:
    return json.dumps(c.to_dict(), sort_keys=True, default=str)


def fingerprint(c: ml_collections.ConfigDict) -> dict:
    """The config fields a checkpoint's contents depend on; a resume must match them."""
    d = json.loads(to_json(c))
    # The scorer's precision changes no saved array (and runs from before it existed resume).
    model = {k: v for k, v in d["model"].items() if k != "score_dtype"}
    return {"method": d["method"], "model": model, "seed": d["seed"]}
