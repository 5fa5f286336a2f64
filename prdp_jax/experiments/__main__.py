"""Reproduces the paper's findings in the embedded world.

    python -m prdp_jax.experiments all                 # every finding, full size (hours)
    python -m prdp_jax.experiments large_scale         # one finding
    python -m prdp_jax.experiments all --quick         # the CI smoke (a tiny model, minutes)
    python -m prdp_jax.experiments all --from-records  # the page and plots from the records

Findings: lr_sweep (run first, automatically), small_scale, large_scale, clipping, beta,
online_offline. Each writes <out>/<finding>.json and plots, and updates the table of
<out>/../results.md (docs/results.md for the full size). Runs live under --runs and are reused:
rerunning a finding reads finished runs back and resumes interrupted ones. Each finished run is
also recorded (config and curve) under <out>/runs/, which is committed with the results, so a
fresh checkout reads those runs back instead of training them again.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import time

from prdp_jax.experiments import findings as findings_lib
from prdp_jax.experiments import report, runner
from prdp_jax.infra import files
from prdp_jax.infra import runtime
from prdp_jax.infra.errors import UserError

ORDER = ("small_scale", "large_scale", "clipping", "beta", "online_offline")


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m prdp_jax.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("finding", choices=("all", "lr_sweep") + ORDER)
    p.add_argument("--quick", action="store_true", help="tiny model and budget (CI smoke)")
    p.add_argument("--out", help="results folder (default docs/results; with --quick "
                                 "runs/experiments-quick/results)")
    p.add_argument("--runs", help="run folders (default runs/experiments[-quick])")
    p.add_argument("--seeds", type=int, help="seeds per arm (default: the size's)")
    p.add_argument("--from-records", action="store_true",
                   help="only read the recorded runs back (seconds): regenerate the page and "
                        "plots of every finding whose runs are all recorded; train nothing")
    return p.parse_args(argv)


class NotRecorded(Exception):
    """A run the results folder has no record of (`--from-records`)."""


class Experiments:
    def __init__(self, size: runner.Size, out: str, runs: str, quick: bool, log=print,
                 from_records: bool = False):
        self.size, self.out, self.runs, self.log = size, out, runs, log
        self.from_records = from_records
        self.base_dir = os.path.join(runs, "base") if quick else None
        self.bases_checked: set[str] = set()
        self.hosts: collections.Counter = collections.Counter()  # the current finding's runs
        os.makedirs(out, exist_ok=True)

    def run_arm(self, scale: str, arm: findings_lib.Arm, learning_rates: dict,
                seeds: int | None = None, reward: dict | None = None) -> list[dict]:
        """Per-seed curves of one arm at one scale (finished runs are read back)."""
        method = arm.overrides.get("method", "prdp")
        lr = learning_rates.get(method)
        where = os.path.join(scale + (f"-{findings_lib.reward_name(reward)}" if reward else ""),
                             f"{method}-lr{lr:g}" if lr else method,
                             runner.arm_key(self.size, arm))
        curves = []
        for seed in range(seeds or self.size.seeds):
            config = runner.run_config(self.size, scale, arm, seed, learning_rates, self.base_dir,
                                       reward)
            record = os.path.join(self.out, "runs", where, f"seed{seed}.json")
            t0 = time.perf_counter()
            curve = runner.recorded(config, record)
            if curve is None and self.from_records:
                raise NotRecorded(record)
            if curve is None:  # a new run: from the recorded runs' base only
                self.check_base(config)
                self.log(f"  {scale:<7} {arm.name:<26} seed {seed}: training "
                         f"({os.path.join(self.runs, where, f'seed{seed}')})")
                curve = runner.run(
                    config, os.path.join(self.runs, where, f"seed{seed}"),
                    log=lambda *a, **k: None, reference_cache=os.path.join(self.runs, "before"),
                    record=record)
            curves.append(curve)
            self.hosts[runner.recorded_host(record)] += 1
            e = curves[-1]["eval"][report.LARGE]
            self.log(f"  {scale:<7} {arm.name:<26} seed {seed}: large sample "
                     f"{e['reward'][0]:.4f} -> {e['reward'][-1]:.4f} "
                     f"({time.perf_counter() - t0:.0f}s)")
        return curves

    def check_base(self, config) -> None:
        """Before the first new run from a base: its evaluation on this machine must equal the
        base the results folder's records start from (`runner.check_base`)."""
        key = runner.reference_key(config)
        if key in self.bases_checked:
            return
        records = os.path.join(self.out, "runs")
        expected = runner.recorded_base(records, config)
        if expected:
            self.log("checking that this machine's base is the recorded runs' base")
            runner.check_base(runner.reference(config, os.path.join(self.runs, "before"),
                                               log=lambda *a, **k: None), expected, records)
        self.bases_checked.add(key)

    def learning_rates(self) -> dict:
        """The swept learning rate of each method (runs the sweep if it has not run)."""
        path = os.path.join(self.out, "lr_sweep.json")
        if not os.path.exists(path):
            if self.from_records:
                raise NotRecorded(path)
            self.lr_sweep()
        with open(path) as f:
            return json.load(f)["chosen"]

    def lr_sweep(self, max_extensions: int = 3) -> None:
        """Each method at each rate of the grid, at the sweep's scale, one seed; the chosen rate
        has the highest final reward on the large-sample set (never the held-out one). While the
        best rate is an end of the grid, the grid grows by a factor of 3 past it."""
        scale = self.size.sweep_scale
        self.log(f"lr_sweep: {self.size.lr_grid} for PRDP and DDPO at {scale} scale, 1 seed")
        table, chosen, grids, base = {}, {}, {}, {}
        for method in ("prdp", "ddpo"):
            arm = findings_lib.Arm(method.upper(), getattr(findings_lib, method)())  # as the findings
            grid, scores = sorted(self.size.lr_grid), {}
            for _ in range(max_extensions + 1):
                for lr in grid:
                    if lr not in scores:
                        (c,) = self.run_arm(scale, arm, {method: lr}, seeds=1)
                        scores[lr] = {n: c["eval"][n]["reward"][-1] for n in c["eval"]}
                        base = {n: c["eval"][n]["reward"][0] for n in c["eval"]}
                best = max(scores, key=lambda lr: scores[lr][report.LARGE])
                if len(grid) < 2 or best not in (grid[0], grid[-1]):
                    break
                grid = [grid[0] / 3] + grid if best == grid[0] else grid + [grid[-1] * 3]
                self.log(f"lr_sweep: {method}'s best rate {best:g} is an end of the grid; "
                         f"extending it to {[f'{g:g}' for g in grid]}")
            chosen[method], grids[method] = best, grid
            table[method] = {f"{lr:g}": scores[lr] for lr in sorted(scores)}
        files.atomic_write_json(os.path.join(self.out, "lr_sweep.json"),
                                {"grid": grids, "scale": scale, "base": base,
                                 "final_rewards": table, "chosen": chosen,
                                 "selected_on": report.LARGE})
        self.log(f"lr_sweep: chosen {chosen}")

    def finding(self, name: str) -> None:
        f = findings_lib.FINDINGS[name]
        lrs = self.learning_rates()
        self.log(f"{name}: {f.title}")
        curves, summaries = {}, {}
        self.hosts.clear()
        for scale in f.scales:
            for arm in f.arms:
                runs = self.run_arm(scale, arm, lrs, reward=f.reward)
                curves[(scale, arm.name)] = runs
                summaries[(scale, arm.name)] = report.summarise(runs)
        held, measured, rule = report.verdict(name, summaries)
        powered, power_text = report.power(name, summaries)
        spread = report.base_spread([c for runs in curves.values() for c in runs])
        if spread:
            self.log(f"{name}: its runs' evaluations of the base differ in the last digits ("
                     + ", ".join(f"{n} {lo:.6f}-{hi:.6f}" for n, (lo, hi) in spread.items())
                     + "): they ran on CPUs that round differently ("
                     + report.hosts_text(self.hosts) + ")")
        for scale in f.scales:
            labelled = {label: c for (s, label), c in curves.items() if s == scale}
            suffix = f"_{scale}" if len(f.scales) > 1 else ""
            report.plot(os.path.join(self.out, f"{name}{suffix}.png"), f"{f.title} ({scale})",
                        labelled, runner.EVAL_SETS)
            if self.size.scales[scale].regime.passes_per_epoch > 1:
                report.plot_clip(os.path.join(self.out, f"{name}{suffix}_clip.png"),
                                 f"{f.title} ({scale}): clip fraction by pass", labelled)
        if name == "beta":
            report.plot_beta(os.path.join(self.out, "beta_tradeoff.png"),
                             {label: c for (_, label), c in curves.items()})
        files.atomic_write_json(os.path.join(self.out, f"{name}.json"), {
            "finding": f.title, "paper": f.paper, "scales": list(f.scales),
            "regimes": {s: dataclasses.asdict(self.size.scales[s]) for s in f.scales},
            "learning_rates": lrs, "reward": dict(f.reward) or {"preference": 1.0},
            "held": held if powered else None, "measured": measured, "rule": rule,
            "power": power_text, "powered": powered, "base_spread": spread,
            "hosts": dict(self.hosts),
            "arms": {f"{s}/{label}": {"summary": summaries[(s, label)],
                                      "curves": curves[(s, label)]} for s, label in curves}})
        verdict = ("held" if held else "did not hold") if powered else \
            "undecided: evaluation too small"
        self.log(f"{name}: {verdict}: {measured} [{power_text}]")


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    size = runner.SIZES["quick" if args.quick else "full"]
    if args.seeds:
        size = runner.dataclasses.replace(size, seeds=args.seeds)
    runs = args.runs or ("runs/experiments-quick" if args.quick else "runs/experiments")
    out = args.out or (os.path.join(runs, "results") if args.quick else "docs/results")
    config = runner.world_config(size.recipe)
    runtime.setup(config)
    try:
        ex = Experiments(size, out, runs, args.quick, from_records=args.from_records)
        page = os.path.join(os.path.dirname(os.path.abspath(out)), "results.md")
        if args.finding == "lr_sweep":
            ex.lr_sweep()
            report.update_page(page, out, ORDER)
            return 0
        names = ORDER if args.finding == "all" else (args.finding,)
        for n in names:  # the page is updated as each finding finishes
            try:
                ex.finding(n)
            except NotRecorded as missing:
                print(f"{n}: skipped: not recorded yet ({missing})")
                continue
            report.update_page(page, out, ORDER)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
