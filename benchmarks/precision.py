"""How precise PRDP's scorer must be: per-step log-ratio rounding noise and clip fractions under
each precision policy (model.dtype / model.score_dtype), on one set of random UNet weights.

    python -m benchmarks.precision [--quick] [--size 8] [--out docs/precision]
    python -m benchmarks.precision --gpu          # the GPU check: 512 px, T = 50 (issue 25)

  bf16          bf16 sampling, bf16 scoring
  bf16_sample   bf16 sampling, float32 scoring (the sampler's log-probs re-scored)
  tf32          float32 activations with TF32 matmuls and convolutions (GPU only; XLA:GPU's
                default for float32 on Ampere and later)
  float32       float32 everywhere, matmuls at full float32 precision (the reference)

For each policy, trajectories are sampled from the weights theta_0 with the policy's sampler and
scored under theta_0 with its scorer (theta_old, train.rescore_old). Then:
  sampler        the largest |sampler's log-prob - scorer's| at theta_0: what the clip would see
                 at theta = theta_old were the sampler's log-probs kept (rescore_old off);
  at theta_old   the per-step log-ratio log pi_theta - log pi_theta_old of a second scoring call,
                 and the clip fraction it gives (must be 0);
  noise          every weight moved by +-1e-5 (random signs, about one lr-1e-5 AdamW step): the
                 per-step log-ratio under the policy's scorer against float32's on the same
                 transitions: median and max |difference|, and their correlation;
  one step       AdamW's first step (lr 1e-5, closed form; PRDP loss on random rewards, the
                 policy's gradient): the fraction of per-step log-ratios beyond +-eps under the
                 policy's scorer and under float32's, for the paper's eps = 1e-6 and 1e-4;
  time, memory   seconds of sampling + scoring the epoch and of the gradient, and the device's
                 peak memory (GPU).
The UNet has Stable Diffusion 1.5's block layout and widths at `--size` latent pixels (the CPU
cannot run 64) with `--layers-per-block` (SD's 2 takes ~16 GB and an hour on 2 cores); --quick runs a tiny model (CI smoke); --gpu runs SD 1.5's shape at 512 px
(64 x 64 latents), T = 50, the paper's CFG 5 with 4 trajectories (2 prompts x 2 images: one
epoch's sampling, scoring and gradient, smaller than the paper's 512 images), adds the TF32 policy
and writes docs/precision_gpu.{json,md}; `timeout 540 python -m benchmarks.precision --gpu` on
one GPU (not yet run: no GPU has been lent to this project).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

# name: (model.dtype, model.score_dtype, JAX's default matmul precision while compiling)
POLICIES = {"bf16": ("bfloat16", "", None), "bf16_sample": ("bfloat16", "float32", None),
            "float32": ("float32", "", "float32")}
GPU_POLICIES = dict(POLICIES, tf32=("float32", "", "tensorfloat32"))
EPSILONS = (1e-6, 1e-4)


def make_setup(case, policy: tuple, steps: int, n: int, images: int, tile: tuple, params=None):
    """The trainer's steps under `policy` (a POLICIES value), compiled; its UNet params replaced
    by `params` (one copy of the weights is shared by every policy: SD 1.5's are 3.4 GB in
    float32)."""
    import contextlib
    import jax
    from benchmarks import ours
    dtype, score_dtype, matmul = policy
    config = ours.make_config(case, steps, n, images, tile, n)
    config.model.dtype, config.model.score_dtype = dtype, score_dtype
    config.train.rescore_old = True
    config.train.learning_rate = 1e-5
    config.mesh.devices = 1
    setup = ours.Setup(case, config, params=params)
    with (jax.default_matmul_precision(matmul) if matmul else contextlib.nullcontext()):
        setup.compile()                            # the precision is part of the compiled steps
    return setup


def measure(case, steps: int, n: int, images: int, tile: tuple, policies: dict = POLICIES,
            log=lambda line: print(line, flush=True)) -> dict:
    """The measurements of the module docstring, one policy at a time (memory: the shared
    theta_0, one perturbed or stepped copy and one gradient live at once)."""
    import jax
    import jax.numpy as jnp
    from prdp_jax.training import epoch as epoch_lib
    truth = make_setup(case, POLICIES["float32"], steps, n, images, tile)
    theta0 = truth.params
    lr, wd = truth.config.train.learning_rate, truth.config.train.weight_decay
    adam_eps = truth.config.train.adam_eps

    @jax.jit
    def perturbed(params):
        """Every weight moved by +-1e-5 (random signs from a fixed key)."""
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(0), len(leaves))
        return jax.tree.unflatten(tree, [p + 1e-5 * jnp.sign(jax.random.normal(k, p.shape, p.dtype))
                                         for p, k in zip(leaves, keys)])

    @jax.jit
    def adamw_first_step(params, grads):
        """AdamW's first step from zero moments, in closed form: bias-corrected m = g, v = g^2,
        so the update is -lr (g / (|g| + eps) + wd theta); clipping g by its global norm
        scales g and leaves this unchanged up to eps."""
        return jax.tree.map(lambda p, g: p - lr * (g / (jnp.abs(g) + adam_eps) + wd * p),
                            params, grads)

    def score(setup, params, data):
        return np.asarray(epoch_lib.score_all(setup.training, params, data, setup.uncond))

    device = jax.devices()[0]
    out = {}
    for name, policy in policies.items():
        t0 = time.perf_counter()
        setup = truth if name == "float32" else make_setup(case, policy, steps, n, images, tile,
                                                           theta0)
        t1 = time.perf_counter()
        data = jax.block_until_ready(setup.epoch_data())   # sampled and scored under theta_0
        epoch_s = time.perf_counter() - t1
        old = np.asarray(data.log_probs_old)
        # the truth's scores of the same transitions (the float32 policy is its own truth)
        truth_score = (lambda params, mine: mine) if setup is truth else \
            (lambda params, mine: score(truth, params, data))
        mine = score(setup, theta0, data)
        at_old = mine - old
        truth_old = truth_score(theta0, mine)
        theta1 = perturbed(theta0)
        mine = score(setup, theta1, data)
        ratio = mine - old
        true_ratio = truth_score(theta1, mine) - truth_old
        del theta1
        noise = np.abs(ratio - true_ratio)
        # One AdamW step with this policy's gradient.
        t1 = time.perf_counter()
        _, grads, _ = jax.block_until_ready(
            epoch_lib.minibatch_gradient(setup.training, theta0, data, setup.uncond, 0))
        gradient_s = time.perf_counter() - t1
        theta2 = adamw_first_step(theta0, grads)
        del grads
        mine = score(setup, theta2, data)
        step_ratio = mine - old
        true_step = truth_score(theta2, mine) - truth_old
        del theta2
        out[name] = {
            "dtype": policy[0], "score_dtype": policy[1] or policy[0], "matmul": policy[2],
            "at_old_max": float(np.abs(at_old).max()),
            "sampler_vs_scorer_max": setup.score_info["logprob_resample_mismatch"],
            "clip_frac_at_old": {str(e): float((np.abs(at_old) > e).mean()) for e in EPSILONS},
            "noise_median": float(np.median(noise)), "noise_max": float(noise.max()),
            "true_ratio_median": float(np.median(np.abs(true_ratio))),
            "correlation": float(np.corrcoef(ratio.ravel(), true_ratio.ravel())[0, 1]),
            "step_ratio_median": float(np.median(np.abs(true_step))),
            "clip_frac_one_step": {str(e): float((np.abs(step_ratio) > e).mean()) for e in EPSILONS},
            "clip_frac_one_step_float32": {str(e): float((np.abs(true_step) > e).mean())
                                           for e in EPSILONS},
            "sample_and_score_s": epoch_s, "gradient_s": gradient_s,
            "peak_memory_bytes": (device.memory_stats() or {}).get("peak_bytes_in_use"),
            "seconds": time.perf_counter() - t0}
        log(f"  {name}: noise median {out[name]['noise_median']:.2e}, max "
            f"{out[name]['noise_max']:.2e}, correlation {out[name]['correlation']:.3f}, "
            f"clip at theta_old {out[name]['clip_frac_at_old']}, after one step "
            f"{out[name]['clip_frac_one_step']} (float32 {out[name]['clip_frac_one_step_float32']})"
            f" [{out[name]['seconds']:.0f} s]")
    return out


def markdown(result: dict) -> str:
    m, r = result["machine"], result["policies"]
    where = (m["jax_device"] if not m["jax_device"].startswith("cpu") else
             f"{m['cpu']} ({m['cores']} cores{', AVX-512' if m['avx512'] else ''})")
    lines = ["# Scorer precision and PRDP's clip", "",
             f"`python -m benchmarks.precision{' --quick' if result['quick'] else ''}` on "
             f"{where}, JAX {m['jax']}, {result['date']}: {result['model']}, T = "
             f"{result['steps']}, {result['trajectories']} trajectories, CFG. Per-step "
             f"log-probs are means over latent elements (the recipes' reduction).", "",
             "| policy (sample / score) | max sampler - scorer at theta_old | max log-ratio at "
             "theta_old (re-scored) | clip frac at theta_old "
             "(1e-6 / 1e-4) | rounding noise median / max | true log-ratio median | "
             "correlation | float32 log-ratio after 1 step, median | clip frac after 1 step "
             "(1e-6 / 1e-4) | float32's after 1 step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    pct = lambda d: " / ".join(f"{v:.1%}" for v in d.values())
    for name, v in r.items():
        lines.append(f"| {name} ({v['dtype']} / {v['score_dtype']}) | "
                     f"{v['sampler_vs_scorer_max']:.1e} | {v['at_old_max']:.1e} | "
                     f"{pct(v['clip_frac_at_old'])} | {v['noise_median']:.1e} / "
                     f"{v['noise_max']:.1e} | {v['true_ratio_median']:.1e} | "
                     f"{v['correlation']:.3f} | {v['step_ratio_median']:.1e} | "
                     f"{pct(v['clip_frac_one_step'])} | "
                     f"{pct(v['clip_frac_one_step_float32'])} |")
    gib = lambda b: "-" if b is None else f"{b / 2**30:.1f}"
    lines += ["", "| policy | sample + score the epoch, s | one minibatch gradient, s | "
              "peak device memory GiB |", "|---|---|---|---|"]
    lines += [f"| {name} | {v['sample_and_score_s']:.1f} | {v['gradient_s']:.1f} | "
              f"{gib(v['peak_memory_bytes'])} |" for name, v in r.items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a tiny model (CI smoke)")
    p.add_argument("--gpu", action="store_true", help="SD 1.5's shape at 512 px, T = 50, + TF32")
    p.add_argument("--size", type=int, default=8, help="latent pixels of the SD-width UNet")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--layers-per-block", type=int, default=1,
                   help="SD 1.5 has 2; 1 halves the CPU study's memory (~8 GB) and time")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import dataclasses
    from benchmarks import cases, sd15
    from benchmarks.__main__ import machine
    policies, n, tile_steps = POLICIES, 4, None
    if args.quick:
        case, steps, out = cases.CASES["micro"], 3, "runs/precision-quick"
    elif args.gpu:
        import jax
        if jax.devices()[0].platform != "gpu":
            print("error: --gpu needs a GPU (jax.devices() has none); run the CPU study without it",
                  file=sys.stderr)
            return 2
        case = dataclasses.replace(sd15.SD15, guidance=5.0)     # the paper's CFG
        steps, policies, tile_steps = 50, GPU_POLICIES, 2
        out = "docs/precision_gpu"
    else:
        case = dataclasses.replace(
            sd15.SD15, name=f"sd15_widths_{args.size}px_{args.layers_per_block}_layers_a_block",
            unet=dict(sd15.SD15.unet, sample_size=args.size,
                      layers_per_block=args.layers_per_block))
        steps, out = args.steps, "docs/precision"
    out = args.out or out
    result = {"machine": machine(), "quick": args.quick, "date": time.strftime("%Y-%m-%d"),
              "model": case.name, "steps": steps, "trajectories": n,
              "policies": measure(case, steps, n, 2, (n, tile_steps or steps), policies)}
    from prdp_jax.infra.files import atomic_write_bytes
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write_bytes(out + ".json", (json.dumps(result, indent=1) + "\n").encode())
    atomic_write_bytes(out + ".md", markdown(result).encode())
    print(f"wrote {out}.json and {out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
