"""Reading published weight files into flat {key: numpy array} state dicts.

- `.safetensors`: read with `safetensors.numpy` (no PyTorch needed); bfloat16 tensors, which numpy
  cannot name, are read from the file's header with `ml_dtypes`.
- `.bin` / `.pt` / `.pth` / `.ckpt`: PyTorch pickles, read with
  `torch.load(map_location='cpu', weights_only=True)`; without PyTorch installed this is a
  WeightsError saying so.
- A Hugging Face model folder: `model.safetensors` (or its sharded index), else
  `pytorch_model.bin` (or its sharded index).

Every failure is a WeightsError naming the file and, where the caller says so, the config field
that points at it.
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Any, Mapping

import numpy as np

from prdp_jax.infra.errors import WeightsError
from prdp_jax.infra.files import read_json

TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


def _where(field: str) -> str:
    return f" (set {field})" if field else ""


def read_state_dict(path: str, *, field: str = "") -> dict[str, Any]:
    """Reads one weight file. Values are numpy arrays (safetensors) or CPU torch tensors.

    Args:
      path: a .safetensors, .bin, .pt, .pth or .ckpt file.
      field: the config field that named the file, quoted in errors.
    """
    if not path:
        raise WeightsError(f"no weight file given{_where(field)}")
    if not os.path.isfile(path):
        what = "is a folder, not a weight file" if os.path.isdir(path) else "does not exist"
        raise WeightsError(f"{path} {what}{_where(field)}")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if path.endswith(TORCH_SUFFIXES):
        return _read_torch(path)
    raise WeightsError(f"{path}: unknown weight format; expected one of .safetensors "
                       f"{' '.join(TORCH_SUFFIXES)}{_where(field)}")


def read_hf_folder(folder: str, *, field: str = "") -> tuple[dict[str, Any], str]:
    """Reads the weights of a Hugging Face model folder (safetensors preferred).

    Returns:
      (state dict, the file or index it came from, for error messages).
    """
    if not folder:
        raise WeightsError(f"no model folder given{_where(field)}")
    if not os.path.isdir(folder):
        what = "is a file, not a model folder" if os.path.isfile(folder) else "does not exist"
        raise WeightsError(f"{folder} {what}{_where(field)}")
    for name in HF_WEIGHT_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".index.json"):
            return _read_sharded(path, field), path
        return read_state_dict(path, field=field), path
    raise WeightsError(f"{folder}: no weights found (expected one of {', '.join(HF_WEIGHT_FILES)})"
                       f"{_where(field)}")


def unwrap_checkpoint(obj: Any, path: str) -> dict[str, Any]:
    """A training checkpoint's model weights: {'state_dict': sd} or a bare sd, with any
    DistributedDataParallel 'module.' prefix removed."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{path}: not a state dict (found {type(obj).__name__}); expected "
                           f"{{key: tensor}} or {{'state_dict': {{key: tensor}}}}")
    if all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _read_sharded(index_path: str, field: str) -> dict[str, Any]:
    index = read_json(index_path, field=field)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, Mapping):
        raise WeightsError(f"{index_path}: no 'weight_map' in the shard index{_where(field)}")
    folder = os.path.dirname(index_path)
    out: dict[str, Any] = {}
    for shard in sorted(set(weight_map.values())):
        out.update(read_state_dict(os.path.join(folder, shard), field=field))
    return out


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    try:
        return load_file(path)
    except TypeError:  # a dtype numpy does not know (bfloat16)
        return _read_safetensors_header(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
                       "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


def _read_safetensors_header(path: str) -> dict[str, np.ndarray]:
    import ml_dtypes
    dtypes = dict(_SAFETENSORS_DTYPES, BF16=ml_dtypes.bfloat16)
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        data = f.read()
    out = {}
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        if spec["dtype"] not in dtypes:
            raise WeightsError(f"{path}: key {key!r} has unsupported dtype {spec['dtype']}")
        start, end = spec["data_offsets"]
        out[key] = np.frombuffer(data[start:end], dtypes[spec["dtype"]]).reshape(spec["shape"])
    return out


def _read_torch(path: str) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise WeightsError(f"{path} is a PyTorch pickle and reading it needs PyTorch "
                           f"(pip install torch; the CPU build is enough), or convert it to "
                           f".safetensors") from None
    import pickle
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0].strip()
        global_name = re.search(r"GLOBAL (\S+)", detail)
        if global_name:
            raise WeightsError(f"{path}: holds a Python object ({global_name.group(1)}) besides "
                               f"tensors, which torch.load(weights_only=True) refuses; if you trust "
                               f"the file, re-save its state dict alone with torch.save") from None
        raise WeightsError(f"{path}: not a readable PyTorch file ({detail})") from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise WeightsError(f"{path}: not a readable PyTorch file ({type(e).__name__}: {e})") from None
    return unwrap_checkpoint(obj, path)
