"""The README's main command, shortened: ``python -m train`` trains and leaves its outputs."""

import json

import pytest

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
