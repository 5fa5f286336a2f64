"""The SD-size case: `python -m benchmarks --cases sd15_512` (one GPU, under 8 minutes on an H100).

An SD 1.5-shaped UNet (320/640/1280/1280 channels, 2 layers a block, 8 heads, 77 x 768 text
context) with random weights, at 512 px (64 x 64 latents), T = 50 with CFG 7.5, under the SD
recipes' precision policy (`configs/sd.py`: model.dtype and param_dtype). Each side runs in its
own process, so neither holds the other's memory:

  ours     the trainer's compiled steps (`benchmarks/ours.py`): sampling images/s, one optimiser
           step's transitions/s with the exact tiled gradient, compile seconds per step, peak
           device memory, and MFU = (XLA's FLOPs of one UNet forward x UNet rows/s) / the
           chip's dense bf16 peak;
  theirs   diffusers' UNet2DConditionModel in PyTorch doing the same sampling and update
           (`benchmarks/theirs.py`) under torch.autocast in the same dtype, on the same GPU.

Without a GPU, `--cases sd15_512` runs the same code at a reduced size (SD's block layout at
1/10 of its widths, 64 px, T = 4) to show the harness works; the table says which it ran.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

from benchmarks.cases import Case

SD15 = Case("sd15_512", dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2,
    num_attention_heads=8, cross_attention_dim=768, norm_num_groups=32),
    text_length=77, text_dim=768, guidance=7.5)
REDUCED = Case("sd15_reduced", dict(
    SD15.unet, sample_size=8, block_out_channels=(32, 64, 128, 128), num_attention_heads=4,
    cross_attention_dim=64, norm_num_groups=8), text_length=77, text_dim=64, guidance=7.5)

# Dense bf16 peak FLOP/s by device kind (vendor data sheets, SXM parts).
PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "TPU v5e": 197e12,
         "TPU v5p": 459e12, "TPU v4": 275e12}


@dataclasses.dataclass(frozen=True)
class Plan:
    case: Case
    steps: int            # T
    sample_batch: int     # trajectories per sampler call
    minibatch: int        # trajectories per optimiser step
    images: int           # per prompt
    tile: tuple           # gradient tile (trajectories, steps)
    repeats: int


GPU_PLAN = Plan(SD15, steps=50, sample_batch=8, minibatch=8, images=4, tile=(4, 2), repeats=3)
CPU_PLAN = Plan(REDUCED, steps=4, sample_batch=4, minibatch=4, images=2, tile=(4, 2), repeats=2)


def sd_precision() -> dict:
    """model.dtype and param_dtype of the SD recipes (configs/sd.py's defaults)."""
    from prdp_jax import config as config_lib
    c = config_lib.load_named("sd")
    return {"dtype": c.model.dtype, "param_dtype": c.model.param_dtype}


def peak_flops(device) -> float | None:
    kind = device.device_kind
    return next((v for k, v in PEAKS.items() if k.lower() in kind.lower()), None)


def ours_side(plan: Plan, precision: dict) -> dict:
    import jax
    from benchmarks import ours
    config = ours.make_config(plan.case, plan.steps, plan.minibatch, plan.images, plan.tile,
                              plan.sample_batch)
    config.model.dtype, config.model.param_dtype = precision["dtype"], precision["param_dtype"]
    config.mesh.devices = 1
    setup = ours.Setup(plan.case, config)
    stats = setup.compile()
    device = jax.devices()[0]
    sample_s = ours.median_seconds(setup.sample, plan.repeats)
    update_s = ours.median_seconds(setup.update_fn(), plan.repeats)
    rows = 2  # FLOPs of one UNet forward of one row (XLA's cost analysis), for the MFU
    row_flops = ours.unet_flops(setup, rows, 1)["flops"] / rows
    unet_rows_per_s = 2 * plan.sample_batch * plan.steps / sample_s   # CFG: 2 rows a step
    peak = peak_flops(device)
    if peak is None and device.platform == "cpu":
        peak = ours.matmul_peak(plan.repeats)["flop_per_s"]
    mem = device.memory_stats() or {}
    return {"device": f"{device.platform}:{device.device_kind}",
            "compile_s": {k: v["seconds"] for k, v in stats.items()},
            "sample_s": sample_s, "images_per_s": plan.sample_batch / sample_s,
            "update_s": update_s, "transitions_per_s": plan.minibatch * plan.steps / update_s,
            "unet_forward_flops": row_flops, "peak_flops": peak,
            "mfu_sampling": row_flops * unet_rows_per_s / peak if peak else None,
            "peak_memory_bytes": mem.get("peak_bytes_in_use")}


def theirs_side(plan: Plan, precision: dict) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from benchmarks import ours, theirs
    from prdp_jax.training import steps as steps_lib
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    case = plan.case
    unet = UNet2DConditionModel(**case.diffusers_config()).to(device).eval()
    if precision["param_dtype"] in ("bfloat16", "float16"):
        unet = unet.to(getattr(torch, precision["param_dtype"]))
    autocast = (getattr(torch, precision["dtype"])
                if precision["dtype"] in ("bfloat16", "float16") else None)
    config = ours.make_config(case, plan.steps, plan.minibatch, plan.images, plan.tile,
                              plan.sample_batch)
    coeffs = steps_lib.policy_coefficients(config)
    uncond = torch.randn(1, case.text_length, case.text_dim)
    policy = theirs.Policy(unet, coeffs, case.guidance, uncond, device, autocast)
    context = torch.randn(plan.sample_batch, case.text_length, case.text_dim, device=device)
    shape = (case.latent_shape[2],) + case.latent_shape[:2]
    gen = torch.Generator(device=device).manual_seed(0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sample_s = theirs.median_seconds(lambda: policy.sample(context, gen, shape), plan.repeats)
    latents, _ = policy.sample(context[:plan.minibatch], gen, shape)
    rewards = torch.rand(plan.minibatch)
    update = theirs.Update(policy, latents, context[:plan.minibatch], rewards, plan.images,
                           plan.tile)
    update_s = theirs.median_seconds(update.step, plan.repeats)
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "sample_s": sample_s, "images_per_s": plan.sample_batch / sample_s,
            "update_s": update_s, "transitions_per_s": plan.minibatch * plan.steps / update_s,
            "peak_memory_bytes": (torch.cuda.max_memory_allocated() if device == "cuda"
                                  else None)}


def run(log=print) -> dict:
    """Both sides, each in a fresh process; the GPU plan on a GPU, the reduced one otherwise."""
    import jax
    gpu = jax.devices()[0].platform == "gpu"
    plan = GPU_PLAN if gpu else CPU_PLAN
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    out = {"case": "sd15_512", "kind": "sd15", "reduced": not gpu, "precision": sd_precision(),
           "plan": {k: (v.name if isinstance(v, Case) else v)
                    for k, v in dataclasses.asdict(plan).items() if k != "case"}}
    out["plan"]["case"] = plan.case.name
    for side in ("ours", "theirs"):
        proc = subprocess.run([sys.executable, "-m", "benchmarks.sd15", side, "gpu" if gpu else "cpu"],
                              env=env, capture_output=True, text=True, timeout=1800,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if proc.returncode:
            raise RuntimeError(f"sd15 {side} failed:\n{proc.stderr[-3000:]}")
        out[side] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"  sd15 {side}: {out[side]['images_per_s']:.2f} images/s, "
            f"{out[side]['transitions_per_s']:.1f} transitions/s")
    out["ratio_sampling"] = out["ours"]["sample_s"] / out["theirs"]["sample_s"]
    out["ratio_update"] = out["ours"]["update_s"] / out["theirs"]["update_s"]
    return out


def markdown(r: dict) -> list[str]:
    o, t, p = r["ours"], r["theirs"], r["plan"]
    gib = lambda b: "-" if b is None else f"{b / 2**30:.1f}"
    where = ("**reduced size on this CPU: the GPU rows are pending a GPU run**" if r["reduced"]
             else f"on {o['device']}")
    lines = ["", "## SD 1.5-shaped UNet (`--cases sd15_512`)", "",
             f"{p['case']}, T = {p['steps']}, CFG, model.dtype {r['precision']['dtype']}, "
             f"param_dtype {r['precision']['param_dtype']}; sampler batch {p['sample_batch']}, "
             f"update minibatch {p['minibatch']} ({p['images']} images a prompt), gradient "
             f"tiles {p['tile'][0]}x{p['tile'][1]}; {where}.", "",
             "| | ours | diffusers / PyTorch | ours / theirs |", "|---|---|---|---|",
             f"| sampling images/s | {o['images_per_s']:.3f} | {t['images_per_s']:.3f} "
             f"| {r['ratio_sampling']:.2f} (time) |",
             f"| update transitions/s | {o['transitions_per_s']:.2f} | "
             f"{t['transitions_per_s']:.2f} | {r['ratio_update']:.2f} (time) |",
             f"| peak device memory GiB | {gib(o['peak_memory_bytes'])} | "
             f"{gib(t['peak_memory_bytes'])} | |",
             "| compile s (" + " / ".join(o["compile_s"]) + ") | "
             + " / ".join(f"{v:.1f}" for v in o["compile_s"].values()) + " | - | |",
             f"| UNet forward GFLOP (one latent) | {o['unet_forward_flops'] / 1e9:.2f} | | |",
             "| sampling MFU | " + ("-" if o["mfu_sampling"] is None else
                                    f"{o['mfu_sampling']:.1%}") + " | | |"]
    return lines


def main() -> int:
    side, kind = sys.argv[1], sys.argv[2]
    plan = GPU_PLAN if kind == "gpu" else CPU_PLAN
    precision = sd_precision()
    fn = ours_side if side == "ours" else theirs_side
    print(json.dumps(fn(plan, precision)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
