"""The paper's findings in the embedded world: `python -m prdp_jax.experiments all --quick` runs
every experiment end to end (a tiny world model, 2 epochs, 1 seed) and writes its results."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINDINGS = ("small_scale", "large_scale", "clipping", "beta", "online_offline")


def test_quick_experiments_write_every_finding(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "runs" / "results"
    proc = subprocess.run([sys.executable, "-m", "prdp_jax.experiments", "all", "--quick",
                           f"--runs={runs}", f"--out={out}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=1500,  # the user's default CPU device split
                          env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = json.loads((out / "lr_sweep.json").read_text())
    assert set(sweep["chosen"]) == {"prdp", "ddpo"}
    for name in FINDINGS:
        result = json.loads((out / f"{name}.json").read_text())
        assert isinstance(result["held"], bool) and result["measured"] and result["rule"]
        for arm in result["arms"].values():
            curve = arm["curves"][0]
            assert curve["eval"]["world_heldout"]["queries"][0] == 0  # the base model first
            assert len(curve["train_reward"]) == 2
    assert (out / "beta_tradeoff.png").stat().st_size > 0
    page = (runs / "results.md").read_text()
    assert all(json.loads((out / f"{n}.json").read_text())["finding"] in page for n in FINDINGS)
