"""The benchmark harness: ours against PyTorch, side by side in one run.

    python -m benchmarks [--quick] [--out docs/benchmarks] [--cases toy tiny_sd world_epoch sd15_512]

For each case (benchmarks/cases.py) it measures, on this machine's default JAX device and with
torch on the same CPU threads:
  sampling     images/s of the trainer's scan sampler with CFG, against a PyTorch loop on
               diffusers' UNet with the same weights (eager, and torch.compile'd where it works)
  update       transitions/s of one optimiser step with the exact microbatched gradient (tiled,
               and in one pass), against the same algorithm in PyTorch
  compile      seconds to compile the sampler, scorer, gradient tile and optimiser step at
               several T (ahead of time, no persistent cache)
  memory       peak resident memory of one optimiser step (a fresh process each) at several T
               and images per prompt, beyond what was resident before it (the stored trajectories
               included)
  flops        achieved FLOP/s of the UNet forward (XLA's cost analysis / median time) over a
               float32 matmul's FLOP/s measured here
Two cases are whole jobs: `world_epoch` (benchmarks/world_epoch.py) times one epoch of the
README's main job phase by phase, here and at a baseline commit in a git worktree; `sd15_512`
(benchmarks/sd15.py) times an SD 1.5-shaped UNet at 512 px on a GPU, or at a reduced size on a CPU.
Each time is the median of several runs after a warm-up. Results: OUT.json and OUT.md (the table,
with every target marked met or not).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

from benchmarks import cases as cases_lib

# (name, what it compares, limit, True if the figure must be <= limit, else >=)
TARGETS = (
    ("sampling", "sampling time, ours / PyTorch eager", 0.7, True),
    ("update", "update-step time, ours / PyTorch eager", 1.0, True),
    ("compile", "compile time, largest T / smallest T", 1.2, True),
    ("memory_steps", "update peak memory, largest T / smallest T", 1.2, True),
    ("flops", "UNet forward FLOP/s / matmul FLOP/s", 0.3, False),
    ("world_epoch", "main-job epoch time, this tree / baseline commit", 0.5, True),
)


def time_torch(row: dict, mode: str, ours_s: float, measure) -> None:
    """Records PyTorch's median seconds `measure()` in `mode` and ours / theirs into `row`, or
    the error if that mode fails (torch.compile fails in many ways on CPU)."""
    try:
        t = measure()
    except Exception as e:  # noqa: BLE001
        row[f"torch_{mode}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return
    row[f"torch_{mode}_s"] = t
    row[f"ratio_vs_{mode}"] = ours_s / t


def machine() -> dict:
    import jax
    import torch
    from prdp_jax.infra import runtime
    device = jax.devices()[0]
    return {**runtime.host(), "cores": os.cpu_count(), "platform": platform.platform(),
            "jax_device": f"{device.platform}:{device.device_kind}",
            "jax_devices": jax.device_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version()}


def isa(m: dict) -> str:
    """The CPU's widest vector extension, as `lscpu` flags name it."""
    return "AVX-512" if m.get("avx512") else "AVX2 only" if m.get("avx2") else "no AVX2"


def use_all_cores(size) -> None:
    """As the trainer does on a CPU host (runtime.configure_cpu_devices): one JAX device per core
    (at most; the count divides every batch), so our side uses every core as torch's threads do."""
    from prdp_jax.infra import runtime
    if "XLA_FLAGS" in os.environ and runtime.DEVICE_COUNT_FLAG in os.environ["XLA_FLAGS"]:
        return
    if not runtime.cpu_only():
        return
    batches = (*size.sample_batches, *size.update_batches, size.tile[0], *size.flop_batches,
               *(2 * b for b in size.memory_images))
    count = max(d for d in range(1, runtime.cores() + 1) if all(b % d == 0 for b in batches))
    runtime.set_cpu_device_count(count)


def log(*args):
    print(*args, flush=True)


_SETUPS: dict = {}


def setup_for(case, steps: int, batch: int, images: int, tile: tuple, gradient: str = "tiled"):
    """(Setup, its compile stats), built and compiled once per configuration."""
    from benchmarks import ours
    key = (case.name, steps, batch, images, tuple(tile), gradient)
    if key not in _SETUPS:
        setup = ours.Setup(case, ours.make_config(case, steps, batch, images, tile, batch,
                                                  gradient))
        _SETUPS[key] = (setup, setup.compile())
    return _SETUPS[key]


def sampling_rows(case, size, rows):
    import torch
    from benchmarks import ours, theirs
    for batch in size.sample_batches:
        setup, _ = setup_for(case, size.sample_steps, batch, min(4, batch), size.tile)
        config = setup.config
        jax_s = ours.median_seconds(setup.sample, size.repeats)
        unet = theirs.make_unet(case, ours.host_params(setup.params))
        coeffs = setup.training.ctx.coeffs
        context = torch.from_numpy(np.array(setup.context))[
            torch.arange(batch) // config.train.images_per_prompt]
        uncond = torch.from_numpy(np.array(setup.uncond))
        shape = (case.latent_shape[2],) + case.latent_shape[:2]
        row = {"case": case.name, "kind": "sampling", "batch": batch, "steps": size.sample_steps,
               "ours_s": jax_s, "ours_images_per_s": batch / jax_s,
               "parity_max_abs": parity(setup, unet)}
        for mode in ("eager", "compile") if size.torch_compile else ("eager",):
            model = unet if mode == "eager" else torch.compile(unet)
            policy = theirs.Policy(model, coeffs, case.guidance, uncond)
            gen = torch.Generator().manual_seed(0)
            time_torch(row, mode, jax_s, lambda: theirs.median_seconds(
                lambda: policy.sample(context, gen, shape), size.repeats))
        log(f"  sampling {case.name} B={batch}: ours {row['ours_images_per_s']:.1f} img/s, "
            f"ratio vs eager {row.get('ratio_vs_eager', float('nan')):.2f}")
        rows.append(row)


def parity(setup, unet) -> float:
    """Max |ours - diffusers| of one UNet forward on the benchmarked weights (a sanity check
    that both sides run the same model)."""
    import torch
    case = setup.case
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2,) + case.latent_shape).astype(np.float32)
    t = np.array([10, 900], np.int32)
    ctx = rng.normal(size=(2, case.text_length, case.text_dim)).astype(np.float32)
    ours = np.asarray(setup.unet.apply({"params": setup.params}, x, t, ctx))
    with torch.no_grad():
        ref = unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t).long(),
                   torch.from_numpy(ctx)).sample.permute(0, 2, 3, 1).numpy()
    return float(np.abs(ours - ref).max())


def update_rows(case, size, rows):
    import torch
    from benchmarks import ours, theirs
    for gradient in size.gradients:
        for batch in size.update_batches:
            images = 4
            setup, _ = setup_for(case, size.sample_steps, batch, images, size.tile, gradient)
            step = setup.update_fn()
            jax_s = ours.median_seconds(step, size.repeats)
            transitions = batch * setup.training.num_steps
            data = setup.epoch_data()
            latents = theirs.to_nchw(np.asarray(data.latents[0]))
            context = torch.from_numpy(np.array(data.context[0]))
            rewards = torch.from_numpy(np.array(data.rewards[0]))
            uncond = torch.from_numpy(np.array(setup.uncond))
            row = {"case": case.name, "kind": "update", "gradient": gradient, "batch": batch,
                   "steps": size.sample_steps, "tile": list(size.tile), "ours_s": jax_s,
                   "ours_transitions_per_s": transitions / jax_s}
            for mode in ("eager", "compile") if size.torch_compile else ("eager",):
                unet = theirs.make_unet(case, ours.host_params(setup.params))
                model = unet if mode == "eager" else torch.compile(unet)
                policy = theirs.Policy(model, setup.training.ctx.coeffs, case.guidance, uncond)
                time_torch(row, mode, jax_s, lambda: theirs.median_seconds(
                    theirs.Update(policy, latents, context, rewards, images, size.tile,
                                  gradient=gradient).step, size.repeats))
            log(f"  update {case.name} {gradient} n={batch}: ours "
                f"{row['ours_transitions_per_s']:.1f} transitions/s, ratio vs eager "
                f"{row.get('ratio_vs_eager', float('nan')):.2f}")
            rows.append(row)


def compile_rows(case, size, rows):
    out = {}
    for steps in size.compile_steps:
        _, stats = setup_for(case, steps, size.update_batches[0], 4, size.tile)
        out[steps] = {k: v["seconds"] for k, v in stats.items()}
    lo, hi = min(out), max(out)
    row = {"case": case.name, "kind": "compile", "seconds": {str(k): v for k, v in out.items()},
           "ratio": sum(out[hi].values()) / sum(out[lo].values()) if hi != lo else None}
    log(f"  compile {case.name}: " + ", ".join(f"T={k} {sum(v.values()):.1f}s"
                                                for k, v in out.items()))
    rows.append(row)


def memory_rows(case, size, rows, fresh_process: bool):
    """One optimiser step of 2 prompts x B images per (T, B); in a fresh process each, or (the
    smoke run) in this one, reusing the compiled setups."""
    from benchmarks import ours
    out = {}
    for steps in size.memory_steps:
        for images in size.memory_images:
            if not fresh_process:
                out[(steps, images)] = ours.update_memory(
                    *setup_for(case, steps, 2 * images, images, size.tile))
                continue
            cmd = [sys.executable, "-m", "benchmarks", "--child-memory", case.name, str(steps),
                   str(images), *map(str, size.tile)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if proc.returncode:
                raise RuntimeError(f"memory child failed: {proc.stderr[-3000:]}")
            out[(steps, images)] = json.loads(proc.stdout.strip().splitlines()[-1])
    lo, hi = min(size.memory_steps), max(size.memory_steps)
    few, many = min(size.memory_images), max(size.memory_images)
    ratio = lambda a, b: out[a]["update_bytes"] / max(out[b]["update_bytes"], 1)
    row = {"case": case.name, "kind": "memory",
           "runs": {f"T={s},B={b}": v for (s, b), v in out.items()},
           "ratio_steps": ratio((hi, few), (lo, few)) if hi != lo else None,
           "ratio_images": ratio((lo, many), (lo, few)) if many != few else None}
    log(f"  memory {case.name}: update {out[(lo, few)]['update_bytes'] / 2**20:.0f} MiB at T={lo},"
        f" {out[(hi, few)]['update_bytes'] / 2**20:.0f} MiB at T={hi}")
    rows.append(row)


def flop_rows(case, size, rows, peak):
    from benchmarks import ours
    setup, _ = setup_for(case, size.sample_steps, size.update_batches[0], 4, size.tile)
    for batch in size.flop_batches:
        f = ours.unet_flops(setup, batch, max(size.repeats, 3))
        row = {"case": case.name, "kind": "flops", "batch": batch, **f,
               "utilisation": f["flop_per_s"] / peak["flop_per_s"]}
        log(f"  flops {case.name} B={batch}: {f['flop_per_s'] / 1e9:.1f} GFLOP/s = "
            f"{row['utilisation']:.0%} of the matmul peak")
        rows.append(row)


def verdicts(rows) -> list[dict]:
    """Every target, with each measurement that it judges."""
    out = []
    for key, what, limit, at_most in TARGETS:
        for r in rows:
            if key in ("sampling", "update") and r["kind"] == key and "ratio_vs_eager" in r:
                value, label = r["ratio_vs_eager"], f"{r['case']} batch {r['batch']}"
                if "gradient" in r:
                    label += f", {r['gradient']} gradient"
            elif key == "compile" and r["kind"] == "compile":
                value, label = r["ratio"], r["case"]
            elif key == "memory_steps" and r["kind"] == "memory":
                value, label = r["ratio_steps"], r["case"]
            elif key == "flops" and r["kind"] == "flops":
                value, label = r["utilisation"], f"{r['case']} batch {r['batch']}"
            elif key == "world_epoch" and r["kind"] == "world_epoch" and r.get("ratio"):
                value, label = r["ratio"], f"configs/world.py:{r['recipe']} vs {r['baseline']}"
            else:
                continue
            if value is None:
                continue  # a smoke run with one T: no ratio
            met = value <= limit if at_most else value >= limit
            out.append({"target": key, "what": what, "where": label, "value": value,
                        "limit": limit, "at_most": at_most, "met": bool(met)})
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    rows = result["rows"]
    lines = ["# Benchmarks", "",
             f"`python -m benchmarks{' --quick' if result['quick'] else ''}` on {m['cpu']} "
             f"({m['cores']} cores, {isa(m)}), JAX {m['jax']} on {m['jax_device']}, "
             f"PyTorch {m['torch']} ({m['torch_threads']} threads), {result['date']}. Medians of "
             f"{result['repeats']} timed runs after a warm-up; ratios are ours / theirs "
             "(below 1: we are faster).", "", "## Targets", "",
             "| target | where | measured | limit | met |", "|---|---|---|---|---|"]
    for v in result["verdicts"]:
        lines.append(f"| {v['what']} | {v['where']} | {v['value']:.2f} | "
                     f"{'<=' if v['at_most'] else '>='} {v['limit']} | "
                     f"{'met' if v['met'] else 'NOT met'} |")
    lines += ["", "## Sampling (CFG, log-probs recorded)", "",
              "| case | batch | T | ours img/s | torch eager s | torch.compile s | ours / eager "
              "| ours / compile | max abs diff of one forward |", "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda r, k: f"{r[k]:.3f}" if k in r else r.get(k.replace("_s", "_error"), "-")
    for r in (r for r in rows if r["kind"] == "sampling"):
        lines.append(f"| {r['case']} | {r['batch']} | {r['steps']} | {r['ours_images_per_s']:.1f} "
                     f"| {fmt(r, 'torch_eager_s')} | {fmt(r, 'torch_compile_s')} "
                     f"| {r.get('ratio_vs_eager', float('nan')):.2f} "
                     f"| {r.get('ratio_vs_compile', float('nan')):.2f} | {r['parity_max_abs']:.1e} |")
    lines += ["", "## Update step (PRDP loss and exact gradient, AdamW)", "",
              "Both sides run the same algorithm: *tiled* scores every transition forward-only, "
              "takes the loss weights, then backpropagates tile by tile (memory of one tile); "
              "*one pass* keeps every tile's activations and backpropagates once.", "",
              "| case | gradient | trajectories | T | tile | ours transitions/s | ours s "
              "| torch eager s | torch.compile s | ours / eager | ours / compile |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "update"):
        lines.append(f"| {r['case']} | {r.get('gradient', 'tiled').replace('_', ' ')} "
                     f"| {r['batch']} | {r['steps']} | {r['tile'][0]}x{r['tile'][1]} "
                     f"| {r['ours_transitions_per_s']:.1f} | {r['ours_s']:.3f} "
                     f"| {fmt(r, 'torch_eager_s')} | {fmt(r, 'torch_compile_s')} "
                     f"| {r.get('ratio_vs_eager', float('nan')):.2f} "
                     f"| {r.get('ratio_vs_compile', float('nan')):.2f} |")
    lines += ["", "## Compile time (seconds: sample / score / grad tile / apply)", "",
              "| case | " + " | ".join(f"T={t}" for t in result["compile_steps"])
              + " | largest / smallest |", "|---|" + "---|" * (len(result["compile_steps"]) + 1)]
    for r in (r for r in rows if r["kind"] == "compile"):
        cells = [" / ".join(f"{v:.1f}" for v in r["seconds"][str(t)].values())
                 + f" ({sum(r['seconds'][str(t)].values()):.1f})" for t in result["compile_steps"]]
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['case']} | " + " | ".join(cells) + f" | {ratio} |")
    lines += ["", "## Update-step memory (a fresh process per run)", "",
              "| case | run | peak RSS MiB | update MiB (peak - before) | stored trajectories MiB "
              "| XLA temp MiB |", "|---|---|---|---|---|---|"]
    mib = lambda v: f"{v / 2 ** 20:.1f}"
    for r in (r for r in rows if r["kind"] == "memory"):
        for name, v in r["runs"].items():
            lines.append(f"| {r['case']} | {name} | {mib(v['peak_rss_bytes'])} | "
                         f"{mib(v['update_bytes'])} | {mib(v['stored_trajectory_bytes'])} | "
                         f"{mib(v['xla_temp_bytes'])} |")
    lines += ["", "## UNet forward FLOP utilisation", "",
              f"float32 matmul peak: {result['matmul']['flop_per_s'] / 1e9:.1f} GFLOP/s "
              f"({result['matmul']['n']}x{result['matmul']['n']}).", "",
              "| case | batch | GFLOP per forward | ms | GFLOP/s | of the matmul peak |",
              "|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "flops"):
        lines.append(f"| {r['case']} | {r['batch']} | {r['flops'] / 1e9:.3f} | "
                     f"{r['seconds'] * 1e3:.2f} | {r['flop_per_s'] / 1e9:.1f} | "
                     f"{r['utilisation']:.0%} |")
    for r in (r for r in rows if r["kind"] == "world_epoch"):
        lines += world_epoch_markdown(r)
    for r in (r for r in rows if r["kind"] == "sd15"):
        from benchmarks import sd15
        lines += sd15.markdown(r)
    if result.get("notes"):
        lines += ["", "## Notes", "", *result["notes"]]
    return "\n".join(lines) + "\n"


def world_epoch_rows(size, rows, baseline):
    from benchmarks import world_epoch
    epochs, rounds, recipe = size.world_epoch
    row = world_epoch.compare(baseline, epochs, rounds, recipe, log=log)
    if row.get("ratio"):
        log(f"  world_epoch: {row['mean']['new']['wall']:.2f}s against "
            f"{row['mean']['old']['wall']:.2f}s at {baseline} = {row['ratio']:.2f}")
    rows.append(row)


def world_epoch_markdown(r) -> list[str]:
    new, old = r["mean"]["new"], r["mean"].get("old")
    runs = r["runs"]["new"][0]
    lines = ["", f"## One epoch of the main job (`configs/world.py:{r['recipe']}`)", "",
             f"Mean of {r['epochs']} epochs after a warm-up, in {r['rounds']} alternating "
             f"fresh processes per tree, every step timed by phase (blocking after each call); "
             f"{runs['devices']} devices."]
    if old is None:
        lines += ["", "| phase | this tree s |", "|---|---|"]
        lines += [f"| {k} | {new[k]:.2f} |" for k in new]
        return lines
    cfg = lambda side: r["runs"][side][0]["config"]
    lines += [f"Baseline: commit `{r['baseline']}` in a git worktree, with its own "
              f"`configs/world.py`. Implementation fields that differ: "
              + ", ".join(f"{k} {cfg('old')[k]} -> {cfg('new')[k]}" for k in cfg("new")
                          if cfg("new")[k] != cfg("old").get(k)) + ".",
              f"The same work at the same numerics: the epochs' losses agree to a relative "
              f"{r['loss_rel_diff']:.1e} and their mean rewards to {r['reward_rel_diff']:.1e}.",
              "", "| phase | baseline s | this tree s | this tree / baseline |",
              "|---|---|---|---|"]
    for k in new:
        ratio = f"{new[k] / old[k]:.2f}" if old[k] > 1e-3 else "-"
        lines.append(f"| {'**epoch**' if k == 'wall' else k} | {old[k]:.2f} | {new[k]:.2f} "
                     f"| {ratio} |")
    compile_s = lambda side: np.mean([x["compile_s"] for x in r["runs"][side]])
    lines += ["", f"Compile before the first epoch (no persistent cache): {compile_s('old'):.1f} s "
              f"at the baseline, {compile_s('new'):.1f} s here."]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every code path once (CI smoke)")
    p.add_argument("--out", help="OUT.json and OUT.md (default docs/benchmarks; with --quick "
                                 "runs/benchmarks-quick)")
    p.add_argument("--cases", nargs="+",
                   choices=sorted(cases_lib.CASES) + ["world_epoch", "sd15_512"])
    p.add_argument("--baseline", default=None,
                   help="commit the world_epoch case compares against (default "
                        "benchmarks.world_epoch.BASELINE; --quick: none)")
    p.add_argument("--child-memory", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.child_memory:
        from benchmarks import ours
        name, steps, images, a, s = args.child_memory
        images = int(images)
        print(json.dumps(ours.update_memory(*setup_for(cases_lib.CASES[name], int(steps),
                                                       2 * images, images, (int(a), int(s))))))
        return 0
    size = cases_lib.SIZES["quick" if args.quick else "full"]
    out = args.out or ("runs/benchmarks-quick" if args.quick else "docs/benchmarks")
    if not args.quick:  # the smoke run compiles faster on one device
        use_all_cores(size)
    from benchmarks import ours
    info = machine()
    log("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    peak = ours.matmul_peak(size.repeats, n=1024 if args.quick else 2048)
    log(f"matmul peak: {peak['flop_per_s'] / 1e9:.1f} GFLOP/s")
    rows = []
    t0 = time.perf_counter()
    for name in args.cases or size.cases:
        if name == "world_epoch":
            log("world_epoch:")
            from benchmarks import world_epoch
            world_epoch_rows(size, rows, args.baseline or (None if args.quick
                                                           else world_epoch.BASELINE))
            continue
        if name == "sd15_512":
            log("sd15_512:")
            from benchmarks import sd15
            rows.append(sd15.run(log=log))
            continue
        case = cases_lib.CASES[name]
        log(f"{name}:")
        sampling_rows(case, size, rows)
        update_rows(case, size, rows)
        compile_rows(case, size, rows)
        memory_rows(case, size, rows, fresh_process=not args.quick)
        flop_rows(case, size, rows, peak)
    result = {"machine": info, "quick": args.quick, "date": time.strftime("%Y-%m-%d"),
              "repeats": size.repeats, "compile_steps": list(size.compile_steps),
              "matmul": peak, "rows": rows, "seconds": time.perf_counter() - t0}
    result["verdicts"] = verdicts(rows)
    notes_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "NOTES.md")
    if os.path.exists(notes_path):
        with open(notes_path) as f:
            result["notes"] = [line.rstrip("\n") for line in f]
    from prdp_jax.infra.files import atomic_write_bytes
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    atomic_write_bytes(out + ".json", (json.dumps(result, indent=1) + "\n").encode())
    atomic_write_bytes(out + ".md", markdown(result).encode())
    met = sum(v["met"] for v in result["verdicts"])
    log(f"wrote {out}.json and {out}.md: {met} of {len(result['verdicts'])} targets met "
        f"({result['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
