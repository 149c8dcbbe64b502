"""Multi-host start-up: ``jax.distributed.initialize`` when the environment or the config asks.

``run.distributed: auto`` initialises when the environment describes more than
one process: ``JAX_COORDINATOR_ADDRESS`` (with ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID``) set by hand, a multi-task SLURM job, or a multi-host TPU
slice (``TPU_WORKER_HOSTNAMES`` lists several hosts). ``on`` always calls it
(JAX then finds the cluster itself), ``off`` never does.
"""

from __future__ import annotations

import os

import jax

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
    env = os.environ
    kwargs = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kwargs = dict(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env.get("JAX_NUM_PROCESSES", "1")),
            process_id=int(env.get("JAX_PROCESS_ID", "0")),
        )
    jax.distributed.initialize(**kwargs)
    return True
