"""The benchmarked model configurations and how each benchmark size runs them.

Each case is a UNet (diffusers `UNet2DConditionModel` field names; ours calls the heads
`num_attention_heads`) with its text-context shape, sampled with CFG. `toy` is the README's
first job (`configs/jpeg_tiny.py`, pixel space); `tiny_sd` is a latent UNet shaped like Stable
Diffusion's (cross-attention at the high resolutions, a plain block at the lowest, 77 tokens);
`micro` only serves the `--quick` smoke run.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    unet: dict                 # UNet fields
    text_length: int           # L: context tokens
    text_dim: int              # D: context width (= cross_attention_dim)
    guidance: float = 5.0

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.unet["sample_size"]
        return (s, s, self.unet["in_channels"])

    def diffusers_config(self) -> dict:
        cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.unet.items()}
        cfg["attention_head_dim"] = cfg.pop("num_attention_heads")
        return cfg


CASES = {
    "micro": Case("micro", dict(   # the smoke test's: every code path in seconds
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
        num_attention_heads=2, cross_attention_dim=16, norm_num_groups=8),
        text_length=8, text_dim=16, guidance=5.0),
    "toy": Case("toy", dict(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
        num_attention_heads=4, cross_attention_dim=32, norm_num_groups=8),
        text_length=4, text_dim=32, guidance=2.0),
    "tiny_sd": Case("tiny_sd", dict(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2, num_attention_heads=4, cross_attention_dim=64, norm_num_groups=16),
        text_length=77, text_dim=64, guidance=5.0),
}


@dataclasses.dataclass(frozen=True)
class Size:
    cases: tuple                  # case names
    sample_batches: tuple         # trajectories per sampler call
    sample_steps: int             # T of the sampling and update throughput runs
    update_batches: tuple         # trajectories per optimiser step (minibatch)
    tile: tuple                   # (trajectories, steps) per gradient tile
    compile_steps: tuple          # T values of the compile-time rows
    memory_steps: tuple           # T values of the memory rows
    memory_images: tuple          # images per prompt of the memory rows
    repeats: int                  # timed runs per figure (after one warm-up); the median is kept
    torch_compile: bool           # also time torch.compile'd models
    flop_batches: tuple           # UNet forward batch sizes of the FLOP-utilisation rows
    gradients: tuple = ("tiled", "one_pass")   # train.gradient modes of the update rows
    world_epoch: tuple = (3, 2, "prdp")        # main-job epochs timed, rounds, recipe


SIZES = {
    "full": Size(cases=("toy", "tiny_sd", "world_epoch", "sd15_512"), sample_batches=(8, 32), sample_steps=10,
                 update_batches=(8, 16), tile=(8, 5), compile_steps=(10, 25, 50),
                 memory_steps=(10, 50), memory_images=(4, 16), repeats=5, torch_compile=True,
                 flop_batches=(8, 64)),
    "quick": Size(cases=("micro", "world_epoch"), sample_batches=(8,), sample_steps=2,
                  update_batches=(8,),
                  tile=(8, 2), compile_steps=(2,), memory_steps=(2,), memory_images=(4,),
                  repeats=1, torch_compile=False, flop_batches=(8,), world_epoch=(1, 1, "tiny")),
}
