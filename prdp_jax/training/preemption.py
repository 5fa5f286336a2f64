"""Preemption: SIGTERM stops a run at the next safe point, with its progress checkpointed.

Schedulers announce an eviction with SIGTERM (Cloud TPU maintenance and spot preemption, SLURM's
`scancel`, `--signal=TERM@...` and time limits, Kubernetes). The trainer asks `requested()` at
fixed points of every epoch: its start, after every sampler batch and after every optimiser step.
Every process asks at the same points, and on a multi-process job the answer is agreed (one
process's signal stops them all at the same point), so the processes never diverge.
"""
from __future__ import annotations

import signal
import threading

import jax
import numpy as np

EXIT_CODE = 128 + signal.SIGTERM  # the conventional status of a process ended by SIGTERM


class Preempted(Exception):
    """A run stopped by SIGTERM after checkpointing; the message says how far it got."""


class StopSignal:
    """Records SIGTERM; `requested()` says, identically on every process, whether to stop."""

    def __init__(self, received: bool = False):
        self._received = received  # True: a SIGTERM came before this was installed
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self._received = True

    def requested(self) -> bool:
        """Whether any process has received SIGTERM; a collective: call it on every process."""
        if jax.process_count() == 1:
            return self._received
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.int32(self._received))
        return bool(np.any(flags))

    def close(self) -> None:
        """Restores the previous SIGTERM handler."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
