"""Files on disk: atomic writes (a crash never leaves a half-written file) and JSON reads that fail
with one line naming the file."""
from __future__ import annotations

import io
import json
import os
from typing import Any, Optional, Type

from prdp_jax.infra.errors import OutputError, UserError, WeightsError


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to a temporary name beside `path` and renames it into place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OutputError(f"cannot write {path} ({e.strerror or e})") from None


def listdir(path: str) -> list[str]:
    """The entries of folder `path`; [] if it does not exist."""
    return os.listdir(path) if os.path.isdir(path) else []


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_image(image, path: str) -> None:
    """Writes a PIL image as PNG, atomically, creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def read_json(path: str, *, field: str = "", missing_ok: bool = False,
              error: Type[UserError] = WeightsError) -> Optional[dict]:
    """The JSON object in `path`; None if it is missing and `missing_ok`.

    Raises `error` naming the file (and the config `field` that points at it, if given) when the
    file is missing, is not JSON, or holds something other than an object.
    """
    where = f" (set {field})" if field else ""
    if not os.path.isfile(path):
        if missing_ok:
            return None
        raise error(f"{path}: file not found{where}")
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not readable JSON ({e}){where}") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, found {type(value).__name__}{where}")
    return value
