"""train.distributed start-up: when ``jax.distributed.initialize`` is called and how it fails.

The runtime itself, with two real processes, is exercised in test_multiprocess.py; here only
the decisions made before it, which must never leave a half-configured job or a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.train.recipes import REPO, subprocess_env
from train import config, distributed
from train.config import ConfigError


@pytest.mark.parametrize("value", ["on", "off", "auto"])
def test_distributed_modes_read_as_strings_unquoted(value, tmp_path):
    """YAML 1.1 would read a bare on/off as a boolean; the config loader reads YAML 1.2's."""
    assert config.load(None, [f"run.distributed={value}"]).run.distributed == value
    path = tmp_path / "c.yaml"
    path.write_text(f"run: {{distributed: {value}}}\n")
    assert config.load(path).run.distributed == value


def test_auto_without_a_cluster_and_off_do_not_initialize(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.maybe_initialize("auto") is False
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
    assert distributed.maybe_initialize("off") is False


def test_a_coordinator_without_a_process_count_is_one_error_line():
    """Not a guess of one process (that would hide the rest of the job): JAX's own detection
    finds no cluster here, and ``python -m train`` says which variables to set. A subprocess,
    since JAX refuses to initialise its runtime once this test process has a backend."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "JAX_"))}
    env["JAX_COORDINATOR_ADDRESS"] = "localhost:1"
    env["PYTHONPATH"] = subprocess_env()["PYTHONPATH"]
    proc = subprocess.run(
        [sys.executable, "-m", "train", "run.steps=1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "JAX_NUM_PROCESSES" in proc.stderr and "Traceback" not in proc.stderr


def test_a_non_integer_process_id_names_the_variable(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "first")
    with pytest.raises(ConfigError, match="JAX_PROCESS_ID must be an integer, got 'first'"):
        distributed.maybe_initialize("on")
