"""The README's main command, shortened: ``python -m train`` trains and leaves its outputs."""

import json
import subprocess
import sys

import pytest

from tests.train.recipes import REPO, subprocess_env
from train.__main__ import main

SMALL = ["model.n_layers=2", "model.d_model=64", "model.seq_len=32", "data.batch_size=16"]


def test_default_command_trains_and_writes_outputs(tmp_path, capsys):
    summary = main(["run.steps=40", "run.eval_every=20", *SMALL, "--workdir", str(tmp_path)])
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 1.0, summary
    assert "eval loss" in capsys.readouterr().out
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [line for line in lines if "loss" in line]
    assert {"loss", "learning_rate", "grad_norm", "tokens_per_second", "step_time"} <= set(
        logged[-1]
    )
    assert (tmp_path / "metrics.png").stat().st_size > 1000
    assert any((tmp_path / "tensorboard").iterdir())
    assert (tmp_path / "checkpoints" / "40").is_dir()


def test_bad_config_is_one_clear_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["optimizer.lerning_rate=1e-3", "--workdir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "optimizer.lerning_rate" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("override", ["model.nope=1", "optimizer.name=adamx", "run.steps=0"])
def test_a_bad_recipe_is_reported_before_jax_loads(override):
    """A fresh process: the recipe is checked first, so a typo costs no JAX start-up."""
    script = f"""
import sys
from train.__main__ import main
try:
    main([{override!r}])
except SystemExit as stop:
    assert stop.code == 2, stop.code
    assert "jax" not in sys.modules, "JAX was imported"
    print("exited 2 without JAX")
"""
    command = [sys.executable, "-c", script]
    done = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 0 and "exited 2 without JAX" in done.stdout, done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
