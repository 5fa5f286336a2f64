"""Evaluates a run's checkpoint (or a base alone) on any prompt sets, with fixed seeds.

    python -m prdp_jax.evaluate --workdir DIR [--epoch N | --base] [--sets a,b,file:PATH]
                                [--seed S] [--samples_per_prompt K] [--max_prompts N] [--out FILE]

It prints (and writes to --out, in the format of a run's eval/summary.json) the reward's mean and
standard error per set and per component before and after, the paired change and the drift;
the evaluation itself is `training/evaluation.py`, the code the training loop uses.
"""
from __future__ import annotations

import os

import jax
import ml_collections

from prdp_jax import config as config_lib
from prdp_jax.infra import files, sharding
from prdp_jax.infra.cli import fail, run_command
from prdp_jax.pipelines.factory import build_pipeline
from prdp_jax.prompts import sets as prompt_sets
from prdp_jax.rewards import combine as rewards_lib
from prdp_jax.training.evaluation import Evaluator, component_table, load_eval_set, table


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str | None, epoch: int | None,
                        base_only: bool, out: str | None, log=print, show_progress: bool = True) -> dict:
    """Evaluates the reference ('before') and, unless `base_only`, a run's checkpoint ('after') on
    `config.eval.sets` with the same seeds; returns (and writes to `out`) the summary."""
    from prdp_jax import export
    config_lib.validate(config)
    if not base_only:
        export.checkpoint_epochs(workdir, epoch)  # a missing checkpoint fails before any work
    mesh = sharding.mesh_from_config(config.mesh)
    reward_fn = rewards_lib.combine(dict(config.reward.weights), config)
    pipe = build_pipeline(config, mesh, log=log)
    sets = {name: load_eval_set(config, pipe, name) for name in config.eval.sets}
    evaluator = Evaluator(config, pipe, mesh, reward_fn)
    frozen, ref_params = pipe.frozen_params(), pipe.unet_params()
    grids = os.path.dirname(os.path.abspath(out)) if out else None

    def run(params, ref, label):
        return {name: evaluator.run(params, ref, frozen, prompts,
                                    config.eval.samples_per_prompt, name,
                                    os.path.join(grids, f"{label}_{prompt_sets.slug(name)}.png")
                                    if grids else None, show_progress)
                for name, prompts in sets.items()}

    log("evaluating the reference (the base)")
    before = run(ref_params, None, "before")
    summary = {"before": before, "seed": config.eval.seed,
               "samples_per_prompt": config.eval.samples_per_prompt}
    if not base_only:
        host, epoch, _, _ = export.restore_unet_params(workdir, epoch)
        params = jax.tree.map(lambda a, s: jax.device_put(a, s.sharding), host,
                              pipe.abstract_unet_params)
        log(f"evaluating epoch {epoch} of {workdir}")
        after = run(params, ref_params, "after")
        summary.update(after=after, epoch=epoch, workdir=os.path.abspath(workdir))
    summary["table"] = table(before, summary.get("after"))
    summary["components"] = component_table(before, summary.get("after"))
    for line in summary["components"] + summary["table"]:
        log(line)
    if out and jax.process_index() == 0:
        files.atomic_write_json(out, summary)
        log(f"wrote {out}")
    return summary


def main(argv=None) -> None:
    import argparse

    from prdp_jax import export
    from prdp_jax.infra import runtime
    from prdp_jax.infra.errors import UserError
    parser = argparse.ArgumentParser(
        prog="python -m prdp_jax.evaluate",
        description="Fixed-seed evaluation of a run's checkpoint against its base, on any prompt "
                    "sets: mean +- standard error per set and component, the paired change, drift.")
    parser.add_argument("--workdir", help="a training run's work directory (its config.json and "
                        "checkpoints/)")
    parser.add_argument("--config", help="with --base and no --workdir: a config file[:recipe]")
    parser.add_argument("--epoch", type=int, default=None, help="checkpoint epoch (default: latest)")
    parser.add_argument("--base", action="store_true", help="evaluate only the reference (base)")
    parser.add_argument("--sets", help="comma-separated prompt sets: names, presets or "
                        "file:PATH[#FIELD] (default: the run's eval.sets)")
    parser.add_argument("--seed", type=int, default=None, help="evaluation noise seed")
    parser.add_argument("--samples_per_prompt", type=int, default=None, help="images per prompt")
    parser.add_argument("--max_prompts", type=int, default=None, help="first N prompts of a set")
    parser.add_argument("--out", help="JSON file to write (grids go beside it)")
    args = parser.parse_args(argv)

    try:
        if args.workdir:
            config = export.read_run_config(args.workdir)
        elif args.config and args.base:
            config = config_lib.load_file(args.config)
        else:
            fail("give --workdir RUN (or --base --config FILE[:recipe] to evaluate a base alone)")
        if args.sets:
            config.eval.sets = tuple(s.strip() for s in args.sets.split(",") if s.strip())
        for field in ("seed", "samples_per_prompt", "max_prompts"):
            if getattr(args, field) is not None:
                config.eval[field] = getattr(args, field)
        if not config.eval.sets:
            fail("no evaluation sets: give --sets, e.g. --sets world_heldout,file:captions.txt")
        if not args.base:
            export.checkpoint_epochs(args.workdir, args.epoch)
        runtime.setup(config)
        evaluate_checkpoint(config, args.workdir, args.epoch, args.base, args.out,
                            show_progress=bool(config.log.progress))
    except UserError as e:
        fail(str(e))


if __name__ == "__main__":
    run_command(main)
