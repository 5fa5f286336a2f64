"""How precise PRDP's scorer must be: per-step log-ratio rounding noise and clip fractions under
three precision policies (model.dtype / model.score_dtype), on one set of random UNet weights.

    python -m benchmarks.precision [--quick] [--size 8] [--out docs/precision]

  bf16          bf16 sampling, bf16 scoring
  bf16_sample   bf16 sampling, float32 scoring (the sampler's log-probs re-scored)
  float32       float32 everywhere

For each policy, trajectories are sampled from the weights theta_0 with the policy's sampler and
scored under theta_0 with its scorer (theta_old, train.rescore_old). Then:
  at theta_old   the per-step log-ratio log pi_theta - log pi_theta_old of a second scoring call,
                 and the clip fraction it gives (must be 0);
  noise          every weight moved by +-1e-5 (random signs, about one lr-1e-5 AdamW step): the
                 per-step log-ratio under the policy's scorer against float32's on the same
                 transitions: median and max |difference|, and their correlation;
  one step       one AdamW step (lr 1e-5, PRDP loss on random rewards, the policy's gradient):
                 the fraction of per-step log-ratios beyond +-eps under the policy's scorer and
                 under float32's, for the paper's eps = 1e-6 and 1e-4.
The UNet has Stable Diffusion 1.5's block layout and widths at `--size` latent pixels (the CPU
cannot run 64); --quick runs a tiny model (CI smoke).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

POLICIES = {"bf16": ("bfloat16", ""), "bf16_sample": ("bfloat16", "float32"),
            "float32": ("float32", "")}
EPSILONS = (1e-6, 1e-4)


def make_setups(case, steps: int, n: int, images: int, tile: tuple):
    from benchmarks import ours
    setups = {}
    for name, (dtype, score_dtype) in POLICIES.items():
        config = ours.make_config(case, steps, n, images, tile, n)
        config.model.dtype, config.model.score_dtype = dtype, score_dtype
        config.train.rescore_old = True
        config.train.learning_rate = 1e-5
        config.mesh.devices = 1
        setups[name] = ours.Setup(case, config)
        setups[name].compile()
    return setups


def measure(case, steps: int, n: int, images: int, tile: tuple, log=print) -> dict:
    import jax
    import jax.numpy as jnp
    from prdp_jax.training import epoch as epoch_lib
    setups = make_setups(case, steps, n, images, tile)
    truth = setups["float32"]
    theta0 = truth.params
    for s in setups.values():
        s.params = theta0
    rng = np.random.default_rng(0)
    signs = jax.tree.map(lambda p: jnp.asarray(np.sign(rng.normal(size=p.shape)), p.dtype), theta0)
    theta1 = jax.tree.map(lambda p, s: p + 1e-5 * s, theta0, signs)

    def score(setup, params, data):
        t = setup.training
        return np.asarray(jnp.stack([t.steps.score(params, data, setup.uncond, m)
                                     for m in t.index[:t.shape.minibatches]]))

    out = {}
    for name, setup in setups.items():
        t0 = time.perf_counter()
        data = setup.epoch_data()                      # sampled and scored under theta_0
        old = np.asarray(data.log_probs_old)
        at_old = score(setup, theta0, data) - old
        ratio = score(setup, theta1, data) - old
        true_ratio = score(truth, theta1, data) - score(truth, theta0, data)
        noise = np.abs(ratio - true_ratio)
        # One AdamW step with this policy's gradient.
        state = setup.training.init_state(jax.tree.map(jnp.copy, theta0))
        loss, grads, _ = epoch_lib.minibatch_gradient(setup.training, state.params, data,
                                                      setup.uncond, 0)
        theta2, _, _, _ = setup.training.steps.apply(state.params, state.opt_state, grads, loss)
        step_ratio = score(setup, theta2, data) - old
        true_step = score(truth, theta2, data) - score(truth, theta0, data)
        out[name] = {
            "dtype": POLICIES[name][0], "score_dtype": POLICIES[name][1] or POLICIES[name][0],
            "at_old_max": float(np.abs(at_old).max()),
            "clip_frac_at_old": {str(e): float((np.abs(at_old) > e).mean()) for e in EPSILONS},
            "noise_median": float(np.median(noise)), "noise_max": float(noise.max()),
            "true_ratio_median": float(np.median(np.abs(true_ratio))),
            "correlation": float(np.corrcoef(ratio.ravel(), true_ratio.ravel())[0, 1]),
            "clip_frac_one_step": {str(e): float((np.abs(step_ratio) > e).mean()) for e in EPSILONS},
            "clip_frac_one_step_float32": {str(e): float((np.abs(true_step) > e).mean())
                                           for e in EPSILONS},
            "seconds": time.perf_counter() - t0}
        log(f"  {name}: noise median {out[name]['noise_median']:.2e}, max "
            f"{out[name]['noise_max']:.2e}, correlation {out[name]['correlation']:.3f}")
    return out


def markdown(result: dict) -> str:
    m, r = result["machine"], result["policies"]
    lines = ["# Scorer precision and PRDP's clip", "",
             f"`python -m benchmarks.precision{' --quick' if result['quick'] else ''}` on "
             f"{m['cpu']} ({m['cores']} cores), {result['date']}: {result['model']}, T = "
             f"{result['steps']}, {result['trajectories']} trajectories, CFG. Per-step "
             f"log-probs are means over latent elements (the recipes' reduction).", "",
             "| policy (sample / score) | max log-ratio at theta_old | clip frac at theta_old "
             "(1e-6 / 1e-4) | rounding noise median / max | true log-ratio median | "
             "correlation | clip frac after 1 step (1e-6 / 1e-4) | float32's after 1 step |",
             "|---|---|---|---|---|---|---|---|"]
    pct = lambda d: " / ".join(f"{v:.1%}" for v in d.values())
    for name, v in r.items():
        lines.append(f"| {name} ({v['dtype']} / {v['score_dtype']}) | {v['at_old_max']:.1e} | "
                     f"{pct(v['clip_frac_at_old'])} | {v['noise_median']:.1e} / "
                     f"{v['noise_max']:.1e} | {v['true_ratio_median']:.1e} | "
                     f"{v['correlation']:.3f} | {pct(v['clip_frac_one_step'])} | "
                     f"{pct(v['clip_frac_one_step_float32'])} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--size", type=int, default=8, help="latent pixels of the SD-width UNet")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from benchmarks import cases, sd15
    from benchmarks.__main__ import machine
    if args.quick:
        case, steps, n = cases.CASES["micro"], 3, 4
    else:
        import dataclasses
        case = dataclasses.replace(sd15.SD15, name=f"sd15_widths_{args.size}px",
                                   unet=dict(sd15.SD15.unet, sample_size=args.size))
        steps, n = args.steps, 4
    out = args.out or ("runs/precision-quick" if args.quick else "docs/precision")
    result = {"machine": machine(), "quick": args.quick, "date": time.strftime("%Y-%m-%d"),
              "model": case.name, "steps": steps, "trajectories": n,
              "policies": measure(case, steps, n, 2, (n, steps))}
    from prdp_jax.infra.files import atomic_write_bytes
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write_bytes(out + ".json", (json.dumps(result, indent=1) + "\n").encode())
    atomic_write_bytes(out + ".md", markdown(result).encode())
    print(f"wrote {out}.json and {out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
