"""Training checkpoints through an Orbax `CheckpointManager`.

Each checkpoint (one per saved epoch, named by the number of completed epochs) holds two items:
  state: params, optimizer state and the base PRNG key, restored straight into their shardings;
  meta:  JSON with the format marker, the config fingerprint, the prompt sampler position, the
         DDPO stat tracker, and a checksum of every array of `state`.
Orbax writes each checkpoint into a temporary directory and renames it when complete, so a crash
mid-write never leaves a checkpoint that looks valid; the checksums, computed on device before
the save and again after every restore, catch bytes changed on disk after that. The frozen
reference is never stored here.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from prdp_jax.infra import files
from prdp_jax.infra.errors import CheckpointError

FORMAT = "prdp-jax/1"


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose bytes cannot be read or fail their checksums.

    `problem` is the message without its advice (what `restore_latest` says when it falls back).
    """

    def __init__(self, problem: str, advice: str = ""):
        super().__init__(problem + advice)
        self.problem = problem


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
        meta = dict(meta, format=FORMAT, fingerprint=self.fingerprint, epoch=epoch,
                    checksums=checksums(state))
        try:
            with _held_output():
                self.manager.save(epoch, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
                self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - Orbax wraps the OSError of a full disk
            self._remove_temporary()
            previous = self._older(epoch)
            kept = (f"checkpoint {previous[-1]} is intact" if previous else "no checkpoint is kept")
            raise CheckpointError(f"cannot write {self.what} {epoch} in {self.directory} "
                                  f"({_root_cause(e)}); {kept}; free space (or fix the directory) "
                                  f"and rerun the same command to resume") from None

    def _remove_temporary(self) -> None:
        """Removes Orbax's half-written step folders (`<step>.orbax-checkpoint-tmp-*`)."""
        for name in files.listdir(self.directory):
            if ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def restore(self, epoch: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restores epoch `epoch` into the shardings of `abstract_state` (ShapeDtypeStructs)."""
        where = os.path.join(self.directory, str(epoch))
        try:
            meta = self.manager.restore(epoch, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpointError(f"checkpoint {where} has no readable prdp-jax metadata "
                                         f"({_one_line(e)}); it is corrupted or foreign",
                                         self._previous_hint(epoch)) from None
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
            raise CorruptCheckpointError(
                f"checkpoint {where} is corrupted or does not match the model: it cannot be "
                f"restored ({_one_line(e)})", self._previous_hint(epoch)) from None
        expected = meta.get("checksums")
        if expected is not None:
            got = checksums(state)
            bad = [k for k in expected if got.get(k) != expected[k]]
            if bad:
                raise CorruptCheckpointError(f"checkpoint {where} is corrupted: {len(bad)} of "
                                             f"{len(expected)} arrays fail their checksum (first: "
                                             f"{bad[0]})", self._previous_hint(epoch))
        return state, meta

    def _older(self, epoch: int) -> list[int]:
        """The saved epochs before `epoch`, oldest first."""
        return sorted(e for e in self.manager.all_steps() if e < epoch)

    def _previous_hint(self, epoch: int) -> str:
        older = self._older(epoch)
        if not older:
            return ""
        return (f"; checkpoint {older[-1]} is the previous one (resume from it with "
                f"--config.checkpoint.fallback=previous)")

    def restore_latest(self, abstract_state: Any, fallback: str = "none",
                       log=print) -> tuple[Optional[int], Any, Optional[dict]]:
        """(epoch, state, meta) of the latest checkpoint, or (None, None, None) if there is none.

        With fallback="previous", a latest checkpoint that fails to restore or verify is moved to
        `<directory>_corrupt/` and the next older one is tried (and so on), saying so.
        """
        while True:
            epoch = self.latest_epoch()
            if epoch is None:
                return None, None, None
            try:
                state, meta = self.restore(epoch, abstract_state)
                return epoch, state, meta
            except CorruptCheckpointError as e:   # not a config mismatch: that is no corruption
                older = self._older(epoch)
                if fallback != "previous" or not older:
                    raise
                aside = os.path.join(self.directory + "_corrupt", str(epoch))
                if os.path.exists(aside):
                    shutil.rmtree(aside)
                os.makedirs(os.path.dirname(aside), exist_ok=True)
                os.rename(os.path.join(self.directory, str(epoch)), aside)
                self.manager.reload()
                log(f"warning: {e.problem}; moved it to {aside} and falling back to checkpoint "
                    f"{older[-1]}")

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


def _root_cause(e: BaseException) -> str:
    """The OS error under Orbax's and TensorStore's wrappers (e.g. 'No space left on device'),
    else one line."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        code = re.search(r"os_error_code='(\d+)'", str(seen))
        if code:
            return os.strerror(int(code.group(1)))
        seen = seen.__cause__ or seen.__context__
    return _one_line(e)


@contextlib.contextmanager
def _held_output():
    """Holds back what a save prints: the log records of absl's logger (which Orbax uses) and
    anything written to file descriptor 2. A good save lets them through afterwards. A failed
    save drops them, and keeps dropping what is written to descriptor 2 from then on (TensorStore's
    callbacks keep printing 'Event loop is closed' tracebacks into Orbax's closed event loop),
    while `sys.stderr` moves to a copy of the real stderr for the run's one error line."""
    logger = logging.getLogger("absl")
    held: list[logging.LogRecord] = []

    def hold(record):
        held.append(record)
        return False

    sys.stderr.flush()
    real_stderr = os.dup(2)
    captured = tempfile.TemporaryFile()
    os.dup2(captured.fileno(), 2)
    logger.addFilter(hold)
    try:
        yield
    except BaseException:
        logger.removeFilter(hold)
        sys.stderr = io.TextIOWrapper(os.fdopen(real_stderr, "wb", buffering=0),
                                      write_through=True)
        raise
    logger.removeFilter(hold)
    sys.stderr.flush()
    os.dup2(real_stderr, 2)
    os.close(real_stderr)
    captured.seek(0)
    os.write(2, captured.read())
    captured.close()
    for record in held:   # the save succeeded
        logger.handle(record)


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    text = text[0].split(" See full TensorStore details")[0] if text else type(e).__name__
    return text[:200]


_MIX = (np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35), np.uint32(0x9E3779B1))


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """[2] uint32: two position-dependent hashes of every bit of x (sums of a murmur3 mix of
    each 32-bit word and its index; integer sums are exact, so the result does not depend on
    the sharding or the reduction order)."""
    x = jnp.asarray(x)
    if x.dtype.itemsize == 4:
        words = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    elif x.dtype.itemsize == 2:
        words = jax.lax.bitcast_convert_type(x, jnp.uint16).reshape(-1).astype(jnp.uint32)
    else:
        words = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32).reshape(-1)
    index = jnp.arange(words.size, dtype=jnp.uint32)

    def mix(h):
        h = h ^ (h >> 16)
        h = h * _MIX[0]
        h = h ^ (h >> 13)
        h = h * _MIX[1]
        return h ^ (h >> 16)

    return jnp.stack([mix(words + index * _MIX[2]).sum(dtype=jnp.uint32),
                      mix(words ^ mix(index + _MIX[0])).sum(dtype=jnp.uint32)])


@jax.jit
def _tree_checksums(tree):
    return jax.tree.map(_leaf_checksum, tree)


def checksums(state: Any) -> dict[str, str]:
    """{leaf path: 16 hex digits}: a checksum of every array of `state`, computed on device
    (one 8-byte value per array reaches the host)."""
    sums = _tree_checksums(state)
    if jax.process_count() > 1:  # each process holds only its shards' arrays
        from jax.experimental import multihost_utils
        sums = multihost_utils.process_allgather(sums, tiled=True)
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(sums))[0]
    return {jax.tree_util.keystr(path): "".join(f"{int(w):08x}" for w in np.asarray(v))
            for path, v in leaves}
