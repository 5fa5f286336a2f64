"""Mapping between PyTorch state dicts (diffusers/transformers layout) and our Flax param trees.

A PyTorch key `down_blocks.0.attentions.1.proj_in.weight` names the Flax path
('down_blocks_0', 'attentions_1', 'proj_in', 'kernel'): numeric segments fold into the name before
them, and the leaf is renamed and laid out by what the Flax module holds there:
conv `kernel` [kh, kw, in, out] <- weight [out, in, kh, kw]; dense `kernel` [in, out] <- weight
[out, in]; norm `scale` <- weight; `embedding` <- weight; `bias` <- bias.
The target tree (concrete or abstract, e.g. from `jax.eval_shape`) decides the layout, so the same
code converts every model and reports exactly which key is missing or mis-shaped.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import flax
import numpy as np

from prdp_jax.infra.errors import WeightsError


def torch_key_to_path(key: str) -> tuple[str, ...]:
    """'a.b.0.c.weight' -> ('a', 'b_0', 'c', 'weight') (the leaf name is still PyTorch's)."""
    out: list[str] = []
    for part in key.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def _leaf_from_torch(value: np.ndarray, target_leaf: str, target_ndim: int) -> np.ndarray:
    if target_leaf != "kernel":
        return value
    if value.ndim == 4 and target_ndim == 2:  # a 1x1 conv checkpoint into a linear layer
        return np.transpose(value[:, :, 0, 0], (1, 0))
    if value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 2 and target_ndim == 4:  # a linear checkpoint into a 1x1 conv
        return np.transpose(value, (1, 0))[None, None]
    if value.ndim == 2:
        return np.transpose(value, (1, 0))
    return value


def _torch_from_leaf(target_leaf: str, value: np.ndarray) -> np.ndarray:
    if target_leaf == "kernel":
        if value.ndim == 4:
            return np.transpose(value, (3, 2, 0, 1))
        if value.ndim == 2:
            return np.transpose(value, (1, 0))
    return value


_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}

# Module-list attributes whose indices fold into Flax names ('resnets.0' <-> 'resnets_0'). Other
# names ending in a digit after an underscore ('linear_1') are plain names.
LIST_NAMES = {"down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
              "downsamplers", "upsamplers", "to_out", "net", "layers"}


def flax_path_to_torch_key(path: tuple[str, ...]) -> str:
    """Inverse of the key mapping: ('down_blocks_0', 'resnets_1', 'conv1', 'kernel') ->
    'down_blocks.0.resnets.1.conv1.weight'."""
    parts = []
    for p in path[:-1]:
        head, _, tail = p.rpartition("_")
        parts.append(f"{head}.{tail}" if head in LIST_NAMES and tail.isdigit() else p)
    parts.append(_LEAF_NAMES.get(path[-1], path[-1]))
    return ".".join(parts)


def state_dict_to_params(state_dict: Mapping[str, Any], target: Any, *, prefix: str = "",
                         source: str = "state dict", dtype: Any = np.float32,
                         strict: bool = False, ignore: Sequence[str] = ()) -> dict:
    """Converts a PyTorch-layout state dict into a Flax param tree shaped like `target`.

    Args:
      state_dict: key -> array-like (numpy, torch tensor or safetensors slice already loaded).
      target: a param tree (arrays or ShapeDtypeStructs) giving every expected path and shape.
      prefix: a key prefix to strip where present (e.g. 'text_model.').
      source: a file or folder name, used in error messages.
      dtype: the numpy dtype of the returned arrays.
      strict: also refuse keys that no target parameter takes (except those matching a regex in
        `ignore`, e.g. buffers): weights for a larger model than the config describes.
    Returns:
      A nested dict of numpy arrays with exactly the target's paths and shapes.
    Raises:
      WeightsError naming the file, key and expected/found shapes. No partial tree is returned.
    """
    flat_target = flax.traverse_util.flatten_dict(target)
    by_path = {}
    for key in state_dict:
        stripped = key[len(prefix):] if prefix and key.startswith(prefix) else key
        by_path.setdefault(torch_key_to_path(stripped), key)
    out = {}
    for path, leaf_target in flat_target.items():
        torch_path = path[:-1] + (_LEAF_NAMES.get(path[-1], path[-1]),)
        key = by_path.get(torch_path)
        if key is None:
            want = prefix + flax_path_to_torch_key(path)
            raise WeightsError(f"{source}: missing key {want!r} (expected shape "
                               f"{_torch_shape(path[-1], tuple(leaf_target.shape))})")
        value = _to_numpy(state_dict[key])
        converted = _leaf_from_torch(value, path[-1], len(leaf_target.shape))
        if tuple(converted.shape) != tuple(leaf_target.shape):
            raise WeightsError(f"{source}: key {key!r} has shape {tuple(value.shape)}, the config "
                               f"expects {_torch_shape(path[-1], tuple(leaf_target.shape))}")
        out[path] = np.asarray(converted, dtype=dtype)
    if strict:
        used = {by_path.get(path[:-1] + (_LEAF_NAMES.get(path[-1], path[-1]),)) for path in flat_target}
        extra = [k for k in state_dict if k not in used and not any(re.search(p, k) for p in ignore)]
        if extra:
            raise WeightsError(f"{source}: unexpected key {extra[0]!r} ({len(extra)} key(s) the "
                               f"config has no parameter for: config and weights disagree)")
    return flax.traverse_util.unflatten_dict(out)


_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_ATTENTION_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def rename_legacy_attention(state_dict: Mapping[str, Any]) -> dict:
    """Renames the VAE mid-block attention's legacy keys (query, key, value, proj_attn) to the
    current ones (to_q, to_k, to_v, to_out.0); other keys pass through unchanged."""
    out = {}
    for key, value in state_dict.items():
        m = _LEGACY_ATTENTION_KEY.match(key)
        if m:
            key = f"{m.group(1)}.{_LEGACY_ATTENTION[m.group(2)]}.{m.group(3)}"
        out[key] = value
    return out


def params_to_state_dict(params: Any, *, prefix: str = "") -> dict[str, np.ndarray]:
    """Converts a Flax param tree back into PyTorch layout (float32 numpy arrays)."""
    flat = flax.traverse_util.flatten_dict(params)
    return {prefix + flax_path_to_torch_key(path): np.ascontiguousarray(
                _torch_from_leaf(path[-1], np.asarray(value, np.float32)))
            for path, value in flat.items()}


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return shape


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of a Flax leaf named `leaf` ('kernel', 'scale', ...) of shape `shape`."""
    return _torch_shape(leaf, tuple(shape))


def to_numpy(value: Any) -> np.ndarray:
    """A numpy array from a numpy array or a (CPU, possibly bfloat16) torch tensor."""
    return _to_numpy(value)
