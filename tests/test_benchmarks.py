"""The benchmark harness: its PyTorch side computes what ours does, and `--quick` runs end to end."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from benchmarks import cases, ours, theirs
from prdp_jax.core import rdp
from prdp_jax.models.convert import params_to_state_dict
from prdp_jax.training import epoch as epoch_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torch_rdp_loss_is_ours():
    rng = np.random.default_rng(0)
    n, T, B = 8, 5, 4
    lp, old, ref = (rng.normal(size=(n, T)).astype(np.float32) for _ in range(3))
    old = lp + rng.normal(size=(n, T)).astype(np.float32) * 0.02
    rewards = rng.normal(size=n).astype(np.float32)
    want, _ = rdp.rdp_loss(lp, old, ref, rewards, images_per_prompt=B, beta=0.1, clip_eps=0.01)
    got = theirs.rdp_loss(*map(torch.from_numpy, (lp, old, ref, rewards)), B, 0.1, 0.01)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("gradient", ["tiled", "one_pass"])
def test_torch_update_gradient_equals_ours(gradient):
    """On the same weights and stored trajectories, the PyTorch update's gradient (diffusers UNet,
    NCHW, tiles, autograd) equals our trainer's exact microbatched gradient, in both modes."""
    case = cases.CASES["micro"]
    setup = ours.Setup(case, ours.make_config(case, 3, 8, 4, (8, 2), 8, gradient))
    setup.compile()
    data = setup.epoch_data()
    # theta moved away from theta_old, so the clip and the max are active on both sides
    params = jax.tree.map(lambda p: p * 1.01, setup.params)
    loss, grads, aux = epoch_lib.minibatch_gradient(setup.training, params, data, setup.uncond, 0)
    assert float(aux["clip_frac"]) > 0
    policy = theirs.Policy(theirs.make_unet(case, ours.host_params(params)), setup.training.ctx.coeffs,
                           case.guidance, torch.from_numpy(np.array(setup.uncond)))
    update = theirs.Update(policy, theirs.to_nchw(np.array(data.latents[0])),
                           torch.from_numpy(np.array(data.context[0])),
                           torch.from_numpy(np.array(data.rewards[0])), 4, (8, 2),
                           gradient=gradient)
    update.old = torch.from_numpy(np.array(data.log_probs_old[0]))
    update.ref = torch.from_numpy(np.array(data.log_probs_ref[0]))
    torch_loss = update.gradient()
    np.testing.assert_allclose(float(torch_loss), float(loss), rtol=1e-4)
    want = params_to_state_dict(ours.host_params(grads))
    got = {k: p.grad.numpy() for k, p in policy.unet.named_parameters()}
    assert set(got) == set(want)
    num = sum(float(np.sum((got[k] - want[k]) ** 2)) for k in want)
    den = sum(float(np.sum(want[k] ** 2)) for k in want)
    assert (num / den) ** 0.5 < 1e-4


@pytest.mark.slow
def test_quick_benchmark_writes_every_measurement(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", f"--out={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(open(f"{out}.json").read())
    kinds = {r["kind"] for r in result["rows"]}
    assert kinds == {"sampling", "update", "compile", "memory", "flops", "world_epoch"}
    assert {r["gradient"] for r in result["rows"] if r["kind"] == "update"} == {"tiled", "one_pass"}
    for r in result["rows"]:
        if r["kind"] in ("sampling", "update"):
            assert r["ours_s"] > 0 and r["torch_eager_s"] > 0 and r["ratio_vs_eager"] > 0
        if r["kind"] == "sampling":
            assert r["parity_max_abs"] < 1e-4
        if r["kind"] == "flops":
            assert r["flops"] > 0 and 0 < r["utilisation"]
    assert {v["target"] for v in result["verdicts"]} >= {"sampling", "update", "flops"}
    world = next(r for r in result["rows"] if r["kind"] == "world_epoch")
    phases = world["mean"]["new"]
    assert phases["sampling"] > 0 and phases["update: gradient"] > 0 and phases["wall"] > 0
    assert abs(sum(v for k, v in phases.items() if k != "wall") - phases["wall"]) < 1e-6
    table = open(f"{out}.md").read()
    assert "## Targets" in table and "micro" in table and "One epoch of the main job" in table


@pytest.mark.slow
def test_world_epoch_compares_two_trees_at_equal_numerics():
    """The world_epoch case runs this tree and a baseline commit's worktree, and (both trees being
    this commit) finds the same losses and rewards."""
    from benchmarks import world_epoch
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    row = world_epoch.compare(head, 1, 1, "tiny", log=lambda *a: None)
    assert set(row["runs"]) == {"old", "new"}
    assert row["runs"]["old"][0]["tree"] != row["runs"]["new"][0]["tree"]
    assert row["loss_rel_diff"] < 1e-5 and row["reward_rel_diff"] < 1e-5
    assert row["ratio"] > 0


@pytest.mark.slow
def test_precision_study_separates_the_scorer_from_the_sampler():
    """benchmarks/precision.py on the micro UNet: every policy's log-ratio at theta_old is exactly
    0; bf16 sampling with float32 scoring scores exactly as float32 does; bf16 scoring does not."""
    from benchmarks import precision
    out = precision.measure(cases.CASES["micro"], 3, 4, 2, (4, 3), log=lambda *a: None)
    assert all(v["at_old_max"] == 0.0 for v in out.values())
    assert out["bf16_sample"]["noise_max"] == 0.0 and out["float32"]["noise_max"] == 0.0
    assert out["bf16"]["noise_median"] > 0.0
