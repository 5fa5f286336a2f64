"""Scale-out: FSDP layouts, 2 processes x 4 devices against 1 x 8, preemption at random times,
and a coordinator that never answers. The multi-process runs go through launch/local.sh and the
real command line (`python -m prdp_jax.main --config tests/configs/tiny.py`)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from conftest import tiny_config
from prdp_jax import config as config_lib
from prdp_jax.training import checkpoint as ckpt_lib
from prdp_jax.training import loop
from test_train import build, host, rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "configs", "tiny.py")


def main_command(workdir, *overrides):
    return [sys.executable, "-m", "prdp_jax.main", f"--config={TINY}", f"--workdir={workdir}",
            *[f"--config.{o}" for o in overrides]]


def env(**extra):
    out = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    out["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    return out


def restore_params(trainer, workdir, epoch, config):
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), 3,
                                 config_lib.fingerprint(config))
    try:
        assert ckpt.latest_epoch() == epoch
        state, _ = ckpt.restore(epoch, trainer.abstract_state())
    finally:
        ckpt.close()
    return host(state.params)


def rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_fsdp_shards_params_optimizer_and_reference_and_trains_like_data_parallel(tmp_path):
    """mesh.fsdp=8: every large parameter, both AdamW moments and the frozen reference hold 1/8
    of their elements per device, and two epochs give the params of the data-parallel mesh
    (a smooth reward and lr 1e-4, for the reasons of the multi-process test below)."""
    results = {}
    for name, axes in (("data", {"mesh.data": 8, "mesh.fsdp": 1}),
                       ("fsdp", {"mesh.data": 1, "mesh.fsdp": 8})):
        config = tiny_config(**{"mesh.devices": 8, "mesh.fsdp_min_size": 256,
                                "train.microbatch_trajectories": 8, "train.learning_rate": 1e-4,
                                **axes})
        config.reward.weights = {"brightness": 1.0}
        out = loop.train_and_evaluate(config, str(tmp_path / name), log=lambda *a: None)
        results[name] = out
    trainer = results["fsdp"]["setup"]
    state = results["fsdp"]["state"]
    ref = trainer.pipe.unet_params()
    mu = state.opt_state[1][0].mu
    large = [(p, m, r) for p, m, r in zip(jax.tree.leaves(state.params), jax.tree.leaves(mu),
                                          jax.tree.leaves(ref)) if p.size >= 256]
    assert len(large) > 10
    for p, m, r in large:
        for a in (p, m, r):
            assert a.addressable_shards[0].data.size * 8 == a.size, a.sharding
    assert rel_err(host(state.params), host(results["data"]["state"].params)) < 1e-5


@pytest.mark.slow
def test_two_processes_of_four_devices_equal_one_process_of_eight(tmp_path):
    """Two PRDP epochs through launch/local.sh (2 simulated hosts x 4 CPU devices, gloo) give the
    params of the same run in one process over 8 devices, and the same rewards.

    The gradient all-reduce sums in another order across processes, so the runs differ by float
    rounding, which AdamW's first steps (about lr * sign(g) per element) amplify in gradient
    components that cancel to near zero; so the learning rate is the paper's order (1e-4, not
    the tiny config's 1e-3: 8 steps still move the params ~1% from init). The reward is the
    smooth `brightness`: JPEG sizes of the second epoch's samples would turn a rounding
    difference in one pixel into a different reward."""
    overrides = {"mesh.devices": 0, "train.microbatch_trajectories": 8, "train.epochs": 2,
                 "train.learning_rate": 1e-4}
    config = tiny_config(**overrides)
    config.reward.weights = {"brightness": 1.0}
    one = loop.train_and_evaluate(config, str(tmp_path / "one"), log=lambda *a: None)
    proc = subprocess.run(
        [os.path.join(ROOT, "launch", "local.sh"), "-n", "2", "-d", "4", "--",
         *main_command(tmp_path / "two", *[f"{k}={v}" for k, v in overrides.items()],
                       'reward.weights={"brightness": 1.0}')[3:]],
        cwd=ROOT, env=env(PYTHON=sys.executable), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 device(s), mesh data=8 fsdp=1 tensor=1 | 2 process(es)" in proc.stdout
    two = restore_params(one["setup"], str(tmp_path / "two"), 2, config)
    assert rel_err(two, host(one["state"].params)) < 1e-5
    for a, b in zip(rows(tmp_path / "one"), rows(tmp_path / "two")):
        np.testing.assert_allclose(a["reward_mean"], b["reward_mean"], rtol=1e-6)
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4)


def is_epoch_line(line):
    return line.startswith("epoch ") and " | reward " in line


def run_until_killed(workdir, after_epochs, delay, sig, *overrides):
    """Starts the main command and sends `sig` `delay` seconds after it logged `after_epochs`
    epochs (0: after its start); returns (returncode, epochs it logged as done, its stderr).
    Timing from the run's own progress, not from another run's wall time, keeps the signal
    inside the run when the machine is busier or idler than during the straight run."""
    with open(f"{workdir}.err", "w+") as err_file:
        proc = subprocess.Popen(main_command(workdir, *overrides), cwd=ROOT, env=env(),
                                stdout=subprocess.PIPE, stderr=err_file, text=True)
        logged, reached = [], threading.Event()

        def read():
            for line in proc.stdout:
                logged.append(is_epoch_line(line))
                if sum(logged) == after_epochs:
                    reached.set()
            reached.set()  # the run ended first: signal at once (the caller's asserts report it)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        if after_epochs:
            reached.wait(timeout=300)
        time.sleep(delay)
        proc.send_signal(sig)
        code = proc.wait(timeout=300)
        reader.join(timeout=60)
        err_file.seek(0)
        return code, sum(logged), err_file.read()


def latest(workdir):
    path = os.path.join(workdir, "checkpoints")
    steps = [int(d) for d in os.listdir(path) if d.isdigit()] if os.path.isdir(path) else []
    return max(steps, default=0)


@pytest.mark.slow
def test_killed_at_random_times_resumes_to_the_straight_run(tmp_path):
    """kill -9 and SIGTERM, each during startup and within the epochs, at random moments, each
    followed by a resume, end with params bitwise equal to an uninterrupted run's and the same
    metrics. kill -9 loses at most the epoch in progress; SIGTERM exits 143 with every finished
    epoch on disk, even when checkpoints are otherwise written every 3 epochs only."""
    epochs = 8
    overrides = (f"train.epochs={epochs}",)
    t0 = time.perf_counter()
    with open(tmp_path / "straight.err", "w") as err_file:
        proc = subprocess.Popen(main_command(tmp_path / "straight", *overrides), cwd=ROOT,
                                env=env(), stdout=subprocess.PIPE, stderr=err_file, text=True)
        epoch_times = [time.perf_counter() - t0 for line in proc.stdout if is_epoch_line(line)]
        code = proc.wait(timeout=300)
    assert code == 0, (tmp_path / "straight.err").read_text()[-3000:]
    assert len(epoch_times) == epochs
    startup = epoch_times[0]
    epoch = (epoch_times[-1] - epoch_times[0]) / (epochs - 1)
    rng = np.random.default_rng(0)
    # (signal, extra overrides, epochs logged before it, seconds after that): kill -9 during
    # startup (imports, build, compile, the first epoch) and within the epochs; SIGTERM within
    # the epochs, so that it lands between checkpoints, and during startup.
    runs = {"kill9_startup": (signal.SIGKILL, (), 0, rng.uniform(0.2, 0.9) * startup),
            "kill9": (signal.SIGKILL, (), int(rng.integers(1, epochs - 1)), rng.uniform(0, epoch)),
            "sigterm": (signal.SIGTERM, ("checkpoint.every_epochs=3",),
                        int(rng.integers(1, epochs - 1)), rng.uniform(0, epoch)),
            "sigterm_startup": (signal.SIGTERM, (), 0, rng.uniform(0.2, 0.6) * startup)}
    for name, (sig, extra, after, delay) in runs.items():
        workdir = tmp_path / name
        code, logged, err = run_until_killed(workdir, after, delay, sig, *overrides, *extra)
        assert code != 0, f"{name}: the run finished before the signal"
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL
            assert latest(workdir) >= logged - 1
        else:
            assert code == 143, err[-3000:]
            assert "stopped by SIGTERM" in err and "rerun the same command to resume" in err
            assert latest(workdir) == logged
        resumed = subprocess.run(main_command(workdir, *overrides, *extra), cwd=ROOT, env=env(),
                                 capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        if latest(workdir) and logged:
            assert "resumed from" in resumed.stdout
    config = tiny_config(**{"train.epochs": epochs})
    trainer, _ = build(config)
    want = restore_params(trainer, str(tmp_path / "straight"), epochs, config)
    for name in runs:
        got = restore_params(trainer, str(tmp_path / name), epochs, config)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(a, b)
        keys = ("epoch", "reward_mean", "loss", "drift")
        assert ([[r[k] for k in keys] for r in rows(tmp_path / name)]
                == [[r[k] for k in keys] for r in rows(tmp_path / "straight")])


@pytest.mark.slow
def test_unreachable_coordinator_fails_in_bounded_time_with_one_line(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    proc = subprocess.run(main_command(tmp_path / "run", "distributed.timeout_s=5"), cwd=ROOT,
                          env=env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                  JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1"),
                          capture_output=True, text=True, timeout=120)
    assert time.perf_counter() - t0 < 60
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "did not come up within distributed.timeout_s=5s" in errors[0]
    assert f"coordinator 127.0.0.1:{port}" in errors[0] and "process 1 of 2" in errors[0]


@pytest.mark.parametrize("env_vars, message", [
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"}, "process count and index are not"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "process id 2 is outside 0..1"),
    ({"SLURM_NTASKS": "two"}, "SLURM_NTASKS='two' is not an integer"),
])
def test_bad_distributed_settings_are_refused(env_vars, message, monkeypatch):
    from prdp_jax.infra import runtime
    from prdp_jax.infra.errors import ConfigError
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env_vars.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=message):
        runtime.initialize_distributed(tiny_config().distributed)


def test_cpu_hosts_split_into_devices_that_divide_every_batch(monkeypatch):
    from prdp_jax.infra import runtime
    from test_train import load_config
    config = load_config("jpeg_tiny")  # 32 trajectories, minibatches and tiles of 8
    assert runtime.auto_cpu_devices(config, 2) == 2
    assert runtime.auto_cpu_devices(config, 6) == 4   # 6 and 5 do not divide 8
    assert runtime.auto_cpu_devices(config, 64) == 8
    config.train.images_per_prompt = 3                # minibatches and tiles of 6, epochs of 24
    assert runtime.auto_cpu_devices(config, 16) == 6
    assert runtime.auto_cpu_devices(config, 5) == 3
    config.mesh.fsdp = 2                              # a hand-made mesh is left alone
    assert runtime.auto_cpu_devices(config, 16) == 1
    # An explicit device count in XLA_FLAGS wins; otherwise the auto count is set there.
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=3")
    assert runtime.configure_cpu_devices(load_config("jpeg_tiny")) == 0
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    monkeypatch.setattr(runtime, "cores", lambda: 2)
    assert runtime.configure_cpu_devices(load_config("jpeg_tiny")) == 2
    assert os.environ["XLA_FLAGS"] == ("--xla_cpu_enable_fast_math=false "
                                       "--xla_force_host_platform_device_count=2")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")     # accelerator hosts are left alone
    monkeypatch.setenv("XLA_FLAGS", "")
    assert runtime.configure_cpu_devices(load_config("jpeg_tiny")) == 0
