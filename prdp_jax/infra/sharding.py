"""The device mesh and the sharding rules, both from config.

The mesh has axes ('data', 'fsdp', 'tensor'). Batches (trajectories, transitions, images) are split
over ('data', 'fsdp') together; parameters and optimizer state are split over 'fsdp' (fully sharded
data parallel) by rules, and replicated over 'data'.

Rules (`mesh.rules`) are (regex, spec) pairs matched against a parameter's path
('down_blocks_0/resnets_0/conv1/kernel'); the first match wins. A spec names, per dimension, a mesh
axis, several joined by '+', or '-' for none (e.g. '-,-,-,fsdp'). Parameters no rule matches are
sharded over 'fsdp' on their largest dimension it divides, if they have at least
`mesh.fsdp_min_size` elements; otherwise they are replicated.
"""
from __future__ import annotations

import math
import re
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from prdp_jax.infra.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(sizes: dict, num_devices: int) -> tuple[int, ...]:
    """Resolves axis sizes (one may be -1: fill the remaining devices) into a full shape."""
    shape = [int(sizes.get(a, 1)) for a in AXES]
    fill = [i for i, s in enumerate(shape) if s == -1]
    if len(fill) > 1:
        raise ConfigError("mesh: at most one of mesh.data / mesh.fsdp / mesh.tensor may be -1")
    if any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"mesh: axis sizes must be positive or -1, got {dict(zip(AXES, shape))}")
    known = math.prod(s for s in shape if s != -1)
    if fill:
        if num_devices % known:
            raise ConfigError(f"mesh: {num_devices} devices are not divisible by the fixed axes "
                              f"{dict(zip(AXES, shape))}")
        shape[fill[0]] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ConfigError(f"mesh: axes {dict(zip(AXES, shape))} need {math.prod(shape)} devices, "
                          f"but {num_devices} are available; use -1 for one axis to fill the rest")
    return tuple(shape)


def num_slices(devices: Sequence[jax.Device]) -> int:
    """How many TPU slices (ICI islands joined over DCN) the devices span; 1 elsewhere."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(sizes: dict, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices of all processes).

    On a multi-slice TPU job the 'data' axis spans the slices (its only collectives, the gradient
    all-reduce, cross the data-centre network once per step) and everything else stays within a
    slice's ICI; 'data' must then be a multiple of the slice count.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ConfigError("mesh: no devices")
    shape = mesh_shape(sizes, len(devices))
    axis_types = (AxisType.Auto,) * len(AXES)
    slices = num_slices(devices)
    if slices == 1:
        return jax.make_mesh(shape, AXES, axis_types=axis_types, devices=devices)
    if shape[0] % slices:
        raise ConfigError(f"mesh: the devices span {slices} TPU slices, so mesh.data={shape[0]} "
                          f"must be a multiple of {slices} (the data axis crosses slices)")
    from jax.experimental import mesh_utils
    ici = (shape[0] // slices,) + shape[1:]
    grid = mesh_utils.create_hybrid_device_mesh(ici, (slices, 1, 1), devices)
    return Mesh(grid, AXES, axis_types=axis_types)


def mesh_from_config(mesh_config) -> Mesh:
    """The mesh of `config.mesh`: its axis sizes over its first `devices` devices (0 = all)."""
    devices = jax.devices()
    count = int(mesh_config.get("devices", 0) or 0)
    if count > len(devices):
        raise ConfigError(f"mesh.devices={count} but only {len(devices)} devices are available")
    if count:
        devices = devices[:count]
    return make_mesh({a: mesh_config.get(a, 1) for a in AXES}, devices)


def batch_shards(mesh: Mesh) -> int:
    """How many pieces the batch dimension is split into."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_divisible(what: str, size: int, shards: int) -> None:
    """Refuses a batch of `size` (config field or quantity `what`) that `shards` cannot split."""
    if size % shards:
        raise ConfigError(f"{what} = {size} is not divisible by the {shards} batch shards "
                          f"(mesh.data x mesh.fsdp); change the batch or the mesh")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading dimension split over ('data', 'fsdp'); the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def constrain_batch(mesh: Mesh):
    """A function that pins an array's leading dimension to the batch axes (inside jit)."""
    sharding = batch_sharding(mesh)
    return lambda x: jax.lax.with_sharding_constraint(x, sharding)


def gather_over_fsdp(shardings: Any):
    """A function that, inside jit, all-gathers a param tree over the 'fsdp' axis (ZeRO-3: each
    weight is gathered where it is used; its gradient is reduce-scattered back). Without it XLA
    may follow the weights' sharding into the activations and replicate the batch instead, which
    at 64-way FSDP multiplies activation memory several times. Identity when nothing is sharded
    over 'fsdp'.

    Args:
      shardings: the params' NamedShardings (a tree shaped like the params).
    """
    def drop_fsdp(s: NamedSharding) -> NamedSharding:
        parts = []
        for axes in s.spec:
            names = (axes,) if isinstance(axes, str) else tuple(axes or ())
            kept = tuple(a for a in names if a != "fsdp")
            parts.append(kept[0] if len(kept) == 1 else (kept or None))
        return NamedSharding(s.mesh, P(*parts))

    leaves = jax.tree.leaves(shardings)
    if not any("fsdp" in str(s.spec) for s in leaves):
        return lambda tree: tree
    targets = jax.tree.map(drop_fsdp, shardings)
    return lambda tree: jax.tree.map(jax.lax.with_sharding_constraint, tree, targets)


def _parse_spec(spec: str, ndim: int, path: str) -> P:
    parts = [p.strip() for p in spec.split(",")] if spec.strip() else []
    if len(parts) != ndim:
        raise ConfigError(f"mesh.rules: spec {spec!r} has {len(parts)} entries but parameter "
                          f"{path} has {ndim} dimensions")
    out = []
    for part in parts:
        if part in ("-", "", "None"):
            out.append(None)
            continue
        names = tuple(part.split("+"))
        for name in names:
            if name not in AXES:
                raise ConfigError(f"mesh.rules: unknown mesh axis {name!r} in {spec!r}; known: {AXES}")
        out.append(names[0] if len(names) == 1 else names)
    return P(*out)


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh, rules: Sequence[tuple[str, str]],
               fsdp_min_size: int) -> P:
    """The PartitionSpec of one parameter."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            parsed = _parse_spec(spec, len(shape), path)
            for dim, axes in zip(shape, parsed):
                size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
                if dim % size:
                    raise ConfigError(f"mesh.rules: {path} dimension {dim} is not divisible by mesh "
                                      f"axes {axes} (size {size})")
            return parsed
    fsdp = mesh.shape["fsdp"]
    if fsdp == 1 or math.prod(shape) < fsdp_min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, str]] = (),
                   fsdp_min_size: int = 2 ** 14) -> Any:
    """NamedShardings for every array leaf of `tree` (arrays or ShapeDtypeStructs).

    Scalars (e.g. optimizer step counts) are replicated.
    """
    def one(path, leaf):
        name = param_path(path)
        shape = tuple(getattr(leaf, "shape", ()))
        if not shape:
            return replicated(mesh)
        return NamedSharding(mesh, param_spec(name, shape, mesh, rules, fsdp_min_size))

    return jax.tree_util.tree_map_with_path(one, tree)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def param_path(path: Sequence[Any]) -> str:
    """A tree path as the '/'-joined name that rules match: 'down_blocks_0/resnets_0/conv1/kernel'."""
    return "/".join(_key_name(k) for k in path)


def parse_rules(rules: Sequence[str]) -> list[tuple[str, str]]:
    """Config strings 'regex=spec' -> [(regex, spec)]."""
    out = []
    for rule in rules:
        if "=" not in rule:
            raise ConfigError(f"mesh.rules: {rule!r} is not of the form 'regex=spec'")
        pattern, spec = rule.rsplit("=", 1)
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"mesh.rules: bad regex {pattern!r}: {e}") from None
        out.append((pattern, spec))
    return out


def put(array: np.ndarray, target: NamedSharding) -> jax.Array:
    """A host array that every process holds in full -> a global array with `target` sharding.

    Each process copies only the shards its own devices hold, so this works on one host and on a
    pod alike.
    """
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, target, lambda index: array[index])


def to_host(x) -> np.ndarray:
    """The full value of a (possibly multi-host) array on every process, as numpy.

    Arrays this process holds whole are copied; others are all-gathered across processes."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_rows(x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """(global row indices [r], those rows [r, ...] as numpy) of a batch-sharded array that this
    process's devices hold."""
    pieces = {}
    for shard in x.addressable_shards:
        start, stop, _ = shard.index[0].indices(x.shape[0]) if shard.index else (0, x.shape[0], 1)
        pieces.setdefault(start, (stop, shard.data))
    rows, data = [], []
    for start in sorted(pieces):
        stop, block = pieces[start]
        rows.append(np.arange(start, stop))
        data.append(np.asarray(block))
    return np.concatenate(rows), np.concatenate(data)


def gather_rows(rows: np.ndarray, values, total: int) -> np.ndarray:
    """Reassembles every process's rows (`local_rows`'s indices, and values computed from them on
    the host; every process calls this) into the full [total, ...] array on every process."""
    from jax.experimental import multihost_utils
    rows = np.asarray(multihost_utils.process_allgather(np.asarray(rows, np.int64))).reshape(-1)
    values = np.asarray(multihost_utils.process_allgather(np.asarray(values)))
    values = values.reshape((-1,) + values.shape[2:])
    out = np.empty((total,) + values.shape[1:], values.dtype)
    out[rows] = values
    return out
