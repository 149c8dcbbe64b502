"""Multi-host start-up: ``jax.distributed.initialize`` when the environment or the config asks.

``run.distributed: auto`` initialises when the environment describes more than
one process: ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID``) set by hand, a multi-task SLURM job, or a multi-host TPU
slice on GKE (``TPU_WORKER_HOSTNAMES`` lists several hosts). ``on`` always calls
it (JAX then finds the cluster itself: SLURM, Open MPI, or a Cloud TPU VM's
metadata, which ``auto`` does not read), ``off`` never does.
"""

from __future__ import annotations

import os
import signal
import threading
import warnings
from typing import Any

import jax
from jax.experimental import multihost_utils

from train.config import ConfigError


def _env_says_multi_process() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def maybe_initialize(mode: str) -> bool:
    """Initialises JAX's distributed runtime if ``mode`` (run.distributed) calls for it."""
    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"run.distributed must be 'auto', 'on' or 'off', got {mode!r}")
    if mode == "off" or (mode == "auto" and not _env_says_multi_process()):
        return False
    # Only what the environment gives: a missing value is left to JAX's own cluster
    # detection (SLURM, Open MPI, TPU metadata) rather than guessed.
    env = os.environ
    kwargs = {}
    for name, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if env.get(name):
            try:
                kwargs[key] = int(env[name])
            except ValueError:
                raise ConfigError(f"{name} must be an integer, got {env[name]!r}") from None
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, TypeError) as err:  # what it raises for missing or inconsistent values
        raise ConfigError(
            f"run.distributed={mode!r}: jax.distributed.initialize failed ({err}); set "
            "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run under a "
            "cluster JAX detects (SLURM, Open MPI, Cloud TPU)"
        ) from None
    return True


class Preemption:
    """Notices a preemption (SIGTERM) and says at which step every process stops.

    One process: a SIGTERM handler sets a flag that :meth:`reached` reports at
    the next step boundary. Several processes: JAX's preemption service (started
    by ``jax.distributed.initialize``) passes a notice from any host to all and
    agrees on one step, so that every process joins the same final checkpoint
    save; :meth:`reached` must then be called at every step by every process.
    """

    def __init__(self) -> None:
        self.signalled = False
        # JAX's preemption service exists only with its distributed runtime; several processes
        # without it (not expected) fall back to this process's own SIGTERM handler.
        self._multi_process = jax.distributed.is_initialized() and jax.process_count() > 1
        if jax.process_count() > 1 and not self._multi_process:
            warnings.warn(
                "several JAX processes but no jax.distributed runtime: a SIGTERM is noticed "
                "only by the process it reaches; start with run.distributed='on'",
                stacklevel=2,
            )
        self._previous = None
        if not self._multi_process and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.signalled = True

    def reached(self, step: int) -> bool:
        """True at the step where this process should checkpoint and stop."""
        if self._multi_process:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signalled

    def close(self) -> None:
        """Puts back the SIGTERM handler there was before."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
