"""The command line: user errors print exactly one `error:` line and exit 2, with no traceback."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = {
    "unknown recipe": (["--config", "configs/jpeg_tiny.py:nope"], "unknown recipe 'nope'"),
    "unknown field": (["--config", "configs/jpeg_tiny.py", "--config.train.epochz=3"], "epochz"),
    "bad value": (["--config", "configs/jpeg_tiny.py", "--config.train.epochs=abc"], "epochs"),
    "missing file": (["--config", "configs/nope.py"], "cannot load --config configs/nope.py"),
    "no config": ([], "--config is required"),
    "one image per prompt": (["--config", "configs/jpeg_tiny.py", "--config.train.images_per_prompt=1"],
                             "images_per_prompt must be >= 2"),
    "unknown reward": (["--config", "configs/jpeg_tiny.py", '--config.reward.weights={"nope": 1.0}'],
                       "unknown reward 'nope'"),
    "unknown prompt set": (["--config", "configs/jpeg_tiny.py", "--config.prompts.train=nope"],
                           "unknown prompt set 'nope'"),
    "mesh does not fit": (["--config", "configs/jpeg_tiny.py", "--config.mesh.data=3"],
                          "need 3 devices, but 1 are available"),
    "unwritable workdir": (["--config", "configs/jpeg_tiny.py", "--workdir", "/dev/null/run"],
                           "cannot be written"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_errors_are_one_line(case, tmp_path):
    args, expected = CASES[case]
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    if "--workdir" not in args and args:
        args = args + ["--workdir", str(tmp_path / "run")]
    proc = subprocess.run([sys.executable, "-m", "prdp_jax.main", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert expected in lines[0]
    assert "Traceback" not in proc.stdout
