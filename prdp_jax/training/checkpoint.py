"""Training checkpoints through an Orbax `CheckpointManager`.

Each checkpoint (one per saved epoch, named by the number of completed epochs) holds two items:
  state: params, optimizer state and the base PRNG key, restored straight into their shardings;
  meta:  JSON with the format marker, the config fingerprint, the prompt sampler position, the
         DDPO stat tracker and the metrics history needed to continue exactly.
Orbax writes each checkpoint into a temporary directory and renames it when complete, so a crash
mid-write never leaves a checkpoint that looks valid. The frozen reference is never stored here.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import orbax.checkpoint as ocp

from prdp_jax.infra.errors import CheckpointError

FORMAT = "prdp-jax/1"


class Checkpointer:
    """Saves and restores (state, meta) per epoch; refuses foreign or mismatched directories.

    `what` names the contents in error messages, `mismatch_advice` says how to fix a mismatch.
    """

    def __init__(self, directory: str, max_to_keep: int, fingerprint: dict,
                 what: str = "checkpoint",
                 mismatch_advice: str = "use a new --workdir or the old config"):
        self.directory = os.path.abspath(directory)
        self.fingerprint = fingerprint
        self.what = what
        self.mismatch_advice = mismatch_advice
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(f"{self.directory} exists and is not a directory")
        try:
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False,
                    cleanup_tmp_directories=True),
                item_names=("state", "meta"))
        except Exception as e:  # noqa: BLE001 - Orbax raises many types for unreadable dirs
            raise CheckpointError(f"cannot open checkpoint directory {self.directory}: "
                                  f"{_one_line(e)}") from None

    def latest_epoch(self) -> Optional[int]:
        step = self.manager.latest_step()
        if step is None:
            self._refuse_foreign_content()
        return step

    def _refuse_foreign_content(self) -> None:
        entries = [e for e in os.listdir(self.directory) if not e.startswith(".")]
        if entries:
            raise CheckpointError(f"{self.directory} holds {entries[:3]} but no prdp-jax checkpoint; "
                                  f"point --workdir at a new or prdp-jax directory")

    def save(self, epoch: int, state: Any, meta: dict) -> None:
        meta = dict(meta, format=FORMAT, fingerprint=self.fingerprint, epoch=epoch)
        self.manager.save(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self, epoch: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores epoch `epoch` into the shardings of `abstract_state` (ShapeDtypeStructs)."""
        where = os.path.join(self.directory, str(epoch))
        try:
            meta = self.manager.restore(epoch, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {where} has no readable prdp-jax metadata "
                                  f"({_one_line(e)}); it is corrupted or foreign") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint {where} is not a {FORMAT} checkpoint")
        diff = _differences(meta.get("fingerprint", {}), self.fingerprint)
        if diff:
            raise CheckpointError(f"{self.what} {where} was written with a different config "
                                  f"({'; '.join(diff[:3])}); {self.mismatch_advice}")
        try:
            state = self.manager.restore(epoch, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))["state"]
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {where} cannot be restored ({_one_line(e)}); "
                                  f"it is corrupted or does not match the model") from None
        return state, meta

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for k in sorted(set(saved) | set(current)):
            out += _differences(saved.get(k), current.get(k), f"{prefix}{k}.")
        return out
    if saved != current:
        return [f"{prefix.rstrip('.')}: saved {saved!r}, now {current!r}"]
    return []


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:300] if text else type(e).__name__
