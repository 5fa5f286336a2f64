"""The on-device machinery shared by model rewards (aesthetic, PickScore, HPSv2, CLIPScore).

- `FrozenParams`: numpy params, replicated onto the devices of the image batch they meet (once per
  device set), so a reward runs where the (sharded) images already are.
- `TextEmbeddings`: prompt embeddings, tokenised on the host, encoded on device in padded chunks
  (few compiled shapes), and cached per prompt on the host ([E] float32 each).
- `image_text_reward`: a Reward whose jitted score function takes the image batch, the params
  and the prompts' embeddings, and returns [B] float32 sharded like the batch. Images never leave
  the device; only the [B] rewards do when the trainer asks for them.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from prdp_jax.infra import sharding as sharding_lib
from prdp_jax.infra.errors import ConfigError
from prdp_jax.rewards.registry import Reward

ScoreFn = Callable[..., jax.Array]


def replicated_like(x: Any) -> jax.sharding.Sharding:
    """A sharding that replicates over the devices holding x (the default device for host data)."""
    s = getattr(x, "sharding", None)
    if isinstance(s, NamedSharding):
        return NamedSharding(s.mesh, P())
    if s is not None and len(s.device_set) > 1:
        devices = np.array(sorted(s.device_set, key=lambda d: d.id))
        return NamedSharding(Mesh(devices, ("devices",)), P())
    if s is not None:
        return SingleDeviceSharding(next(iter(s.device_set)))
    return SingleDeviceSharding(jax.local_devices()[0])


class FrozenParams:
    """Host (numpy) params, placed replicated on a batch's devices on first use there. Only the
    latest placement is kept, so at most one device copy exists."""

    def __init__(self, params: Any):
        self.host = params
        self._key = None
        self._placed = None

    def like(self, x: Any) -> Any:
        target = replicated_like(x)
        if target != self._key:
            self._placed = None  # free the old copy before making the new one
            self._placed = jax.tree.map(lambda a: sharding_lib.put(np.asarray(a), target), self.host)
            self._key = target
        return self._placed


def _bucket(n: int) -> int:
    return max(8, 1 << (n - 1).bit_length())


class TextEmbeddings:
    """Unit-norm prompt embeddings, cached per prompt string.

    Args:
      tokenize: [N] strings -> [N, L] int32 ids (host).
      encode: (params, ids [N, L]) -> [N, E] float32 (jitted, on device).
    """

    def __init__(self, tokenize: Callable[[Sequence[str]], np.ndarray],
                 encode: Callable[[Any, jax.Array], jax.Array]):
        self.tokenize = tokenize
        self.encode = encode
        self.cache: dict[str, np.ndarray] = {}

    def lookup(self, params: Any, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """-> (table [U, E] float32 of the unique prompts, index [B] int32 into it)."""
        unique = list(dict.fromkeys(prompts))
        missing = [p for p in unique if p not in self.cache]
        if missing:
            size = _bucket(len(missing))
            for start in range(0, len(missing), size):
                chunk = missing[start:start + size]
                ids = self.tokenize(chunk + [""] * (size - len(chunk)))
                emb = self.encode(params, ids)
                emb = np.asarray(emb.addressable_data(0) if hasattr(emb, "addressable_data") else emb,
                                 np.float32)
                self.cache.update(zip(chunk, emb[:len(chunk)]))
        table = np.stack([self.cache[p] for p in unique])
        row = {p: i for i, p in enumerate(unique)}
        return table, np.asarray([row[p] for p in prompts], np.int32)


def image_text_reward(score: ScoreFn, params: FrozenParams,
                      text: TextEmbeddings | None) -> Reward:
    """A Reward computing `score(params, images, text_table, text_index)` on device.

    `score` is jitted here; with `text=None` it is called as `score(params, images)`. It returns
    the [B] rewards, or ([B] rewards, {name: [B] array}) to report more in `info`.
    """
    jitted = jax.jit(score)

    def fn(images, prompts, metadata):
        if not isinstance(images, jax.Array):
            images = jnp.asarray(np.asarray(images, np.float32))
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ConfigError(f"image rewards take [B, H, W, 3] images, got shape {images.shape}")
        placed = params.like(images)
        if text is None:
            out = jitted(placed, images)
        else:
            if len(prompts) != images.shape[0]:
                raise ConfigError(f"{len(prompts)} prompts for {images.shape[0]} images")
            table, index = text.lookup(placed, prompts)
            out = jitted(placed, images, table, index)
        return out if isinstance(out, tuple) else (out, {})

    return Reward(fn, on_device=True)


def section(config: Any, name: str) -> Mapping[str, Any]:
    """config.reward.<name> as a dict ({} when config or the section is missing)."""
    try:
        node = config.reward[name]
    except (AttributeError, KeyError, TypeError):
        return {}
    return dict(node.to_dict() if hasattr(node, "to_dict") else node)


def required_path(config: Any, name: str, key: str, what: str) -> str:
    """A non-empty config.reward.<name>.<key>, else a ConfigError saying what to set."""
    value = str(section(config, name).get(key, "") or "")
    if not value:
        raise ConfigError(f"reward {name!r} needs reward.{name}.{key}: {what}")
    return value
