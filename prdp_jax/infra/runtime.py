"""Process-level JAX setup: the multi-controller runtime and the persistent compilation cache.

One process per host: `jax.distributed.initialize` joins them into one runtime whose devices form
the global mesh. `distributed.mode="auto"` (the default) initialises it when the environment
names a multi-process job, and stays single-process otherwise:
  - JAX_COORDINATOR_ADDRESS (or distributed.coordinator_address) with JAX_NUM_PROCESSES and
    JAX_PROCESS_ID (or the config fields): explicit, e.g. launch/local.sh or a custom launcher;
  - SLURM with more than one task (SLURM_NTASKS > 1): JAX reads the SLURM variables;
  - Open MPI with more than one rank (OMPI_COMM_WORLD_SIZE > 1);
  - a Cloud TPU VM that is one worker of several (TPU_WORKER_HOSTNAMES lists more than one).
If the processes have not all joined within `distributed.timeout_s`, every process stops with one
`error:` line naming the coordinator, instead of hanging or crashing inside the runtime.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import re
import sys
import threading
from typing import Optional

import jax

from prdp_jax.infra.errors import ConfigError

MODES = ("auto", "on", "off")


def enable_compilation_cache(path: str) -> None:
    """Caches compiled XLA programs on disk; repeat runs and test sessions skip most compiles."""
    if not path:
        return
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                       "jax_rocm7_plugin", "libtpu", "jax_plugins.xla_cuda12")
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def cpu_only() -> bool:
    """Whether JAX will run on the CPU: JAX_PLATFORMS says so, or no accelerator plugin is
    installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] == "cpu"
    return not any(importlib.util.find_spec(p.split(".")[0]) is not None
                   for p in ACCELERATOR_PLUGINS)


def auto_cpu_devices(config, cores: int) -> int:
    """The most devices (at most one per core) that divide every batch of the config, when the
    mesh is the default data-parallel one over all devices; else 1."""
    m, t = config.mesh, config.train
    if m.devices or m.data != -1 or m.fsdp != 1 or m.tensor != 1:
        return 1
    B = t.images_per_prompt
    epoch = t.prompts_per_epoch * B
    sizes = [epoch, config.sample.batch_size or epoch, t.prompts_per_minibatch * B,
             min(t.microbatch_trajectories, t.prompts_per_minibatch * B)]
    if config.eval.sets:
        sizes.append(config.eval.batch_size)
    if "pretrain" in config:  # the embedded world's base model pretraining
        sizes.append(config.pretrain.batch_size)
    return max(d for d in range(1, max(cores, 1) + 1) if all(s % d == 0 for s in sizes))


def configure_cpu_devices(config) -> int:
    """On a CPU host, presents the cores as `mesh.cpu_devices` XLA devices (0 = auto), so the
    trainer runs data-parallel over them. XLA:CPU runs each convolution on one thread, so one
    device per core is up to 2x faster on convolution-heavy UNets. An explicit
    --xla_force_host_platform_device_count in XLA_FLAGS wins; it must be set before JAX creates
    its backends. Returns the device count it set (0 if it left XLA's default)."""
    flags = os.environ.get("XLA_FLAGS", "")
    count = int(config.mesh.cpu_devices)
    if DEVICE_COUNT_FLAG in flags or count == 1 or not cpu_only():
        return 0
    if count < 0:
        raise ConfigError(f"mesh.cpu_devices must be 0 (auto) or a positive count, got {count}")
    if count == 0:
        count = auto_cpu_devices(config, cores())
        if count == 1:
            return 0
    set_cpu_device_count(count)
    return count


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0))


def host() -> dict:
    """What makes this machine's numbers what they are: the CPU's name, its vector extensions
    (`lscpu` flags: XLA's rounding and speed differ between AVX2 and AVX-512) and JAX's version."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.readlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    name = names[0] if names else platform.processor() or "unknown"
    flags = set(next((line.split(":", 1)[1].split() for line in lines
                      if line.startswith("flags")), []))
    return {"cpu": name, "avx512": "avx512f" in flags, "avx2": "avx2" in flags,
            "jax": jax.__version__}


def set_cpu_device_count(count: int) -> None:
    """Makes the CPU backend `count` devices (before JAX creates its backends)."""
    flags = re.sub(rf"{DEVICE_COUNT_FLAG}=\S+", "", os.environ.get("XLA_FLAGS", "")).strip()
    os.environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={count}".strip()


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def cluster_kind(d) -> Optional[str]:
    """Which multi-process job the environment (or config) describes, or None for one process."""
    if d.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "explicit"
    if (_env_int("SLURM_NTASKS") or 1) > 1:
        return "slurm"
    if (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "openmpi"
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return "cloud_tpu"
    return None


def initialize_distributed(d) -> None:
    """Joins the multi-process runtime described by `config.distributed` (see module doc)."""
    if d.mode not in MODES:
        raise ConfigError(f"distributed.mode must be one of {MODES}, got {d.mode!r}")
    if jax.distributed.is_initialized():
        return
    kind = cluster_kind(d) if d.mode == "auto" else ("explicit" if d.mode == "on" else None)
    if kind is None:
        return
    if d.timeout_s <= 0:
        raise ConfigError(f"distributed.timeout_s must be > 0, got {d.timeout_s}")
    kwargs = {}
    if kind == "explicit":
        address = d.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
        count = d.num_processes if d.num_processes > 0 else _env_int("JAX_NUM_PROCESSES")
        index = d.process_id if d.process_id >= 0 else _env_int("JAX_PROCESS_ID")
        if address and (count is None or index is None):
            raise ConfigError(f"distributed: coordinator {address} is set but the process count "
                              f"and index are not; set JAX_NUM_PROCESSES and JAX_PROCESS_ID (or "
                              f"distributed.num_processes / distributed.process_id)")
        if address:
            if not 0 <= index < count:
                raise ConfigError(f"distributed: process id {index} is outside 0..{count - 1}")
            kwargs = dict(coordinator_address=address, num_processes=count, process_id=index)
    where = kwargs.get("coordinator_address", f"the {kind} coordinator")
    who = (f"process {kwargs['process_id']} of {kwargs['num_processes']}" if kwargs
           else "this process")
    # The runtime aborts the process with a C++ stack trace when its own deadline passes; this
    # watchdog says what is wrong first, in one line, and exits with the user-error status.
    watchdog = threading.Timer(d.timeout_s, _give_up, args=(
        f"the distributed runtime did not come up within distributed.timeout_s={d.timeout_s}s "
        f"({who}, coordinator {where}); check that every process was started and that the "
        f"coordinator address is reachable from this host",))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(initialization_timeout=int(d.timeout_s) + 60, **kwargs)
    except (ValueError, TypeError, RuntimeError) as e:
        raise ConfigError(f"distributed: cannot initialise the runtime ({kind}): "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    finally:
        watchdog.cancel()


def _give_up(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(2)


def setup(config) -> None:
    """Everything a run needs before its first JAX computation (called once, by `main`)."""
    configure_cpu_devices(config)
    initialize_distributed(config.distributed)
    enable_compilation_cache(config.log.compile_cache)
