"""The Optuna search (train/search.py) on configs/search_tiny.yaml (10-step image MLP runs).

What is proved here:

* (slow) 5 trials of TPE find a config whose final eval loss beats the base config's own
  (AdamW at 1e-3, same 10 steps); results.csv/results.md list every trial, best.yaml loads
  to the best trial's config and, run with ``python -m train``, reproduces its eval loss;
  the plots and importances are written;
* (slow, same run) a rerun with ``search.trials`` raised to 6 continues the same study: the
  5 trials are kept as they were and exactly one new trial (and trial directory) is added;
  a rerun with the budget already met runs nothing;
* a trial left RUNNING by a killed search is marked failed when the study is reopened;
* bad search spaces (unknown key, reversed or non-positive log range, a choice or range end
  the trainer refuses, an unknown distribution) are ConfigErrors naming
  ``search.space.<key>``, and the CLI turns them into one ``error:`` line and exit 2.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib

import optuna
import pytest

from train import config, loop, search
from train.__main__ import main as train_main
from train.config import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "search_tiny.yaml"


def load(*overrides: str) -> config.Config:
    return config.load(TINY, list(overrides))


@pytest.mark.slow
def test_search_beats_the_base_config_and_resumes(tmp_path):
    workdir = tmp_path / "search"
    # No metrics.png per trial (a second of matplotlib each); the study's own figures are drawn.
    first = ["run.plot=false", "search.trials=5"]
    study = search.run(load(*first), workdir, path=TINY, overrides=first, progress=False)
    trials = study.trials
    assert len(trials) == 5 and all(t.state.name in search.FINISHED for t in trials)

    base = loop.fit(load(first[0]), tmp_path / "base", progress=False)["final_eval_loss"]
    best = study.best_trial
    # The base lr is 10x below what 10 steps want: the best of 5 trials should clearly win.
    assert best.value < base, (best.value, base)

    rows = list(csv.DictReader((workdir / "results.csv").read_text().splitlines()))
    assert [int(r["number"]) for r in rows] == list(range(5))
    assert float(rows[best.number]["eval_loss"]) == pytest.approx(best.value)
    assert f"| {best.number} (best) |" in (workdir / "results.md").read_text()
    for name in ("history.png", "importance.png"):
        assert (workdir / name).stat().st_size > 0
    importances = json.loads((workdir / "importance.json").read_text())
    assert set(importances) == set(load().search.space)

    best_cfg = config.load(workdir / "best.yaml")
    for key, value in best.params.items():
        section, name, *deeper = key.split(".")
        got = getattr(getattr(best_cfg, section), name)
        for part in deeper:
            got = got[part]
        assert got == pytest.approx(value) if isinstance(value, float) else got == value
    # best.yaml is a run: the same config, seed and devices give the trial's eval loss again
    # (float32 on CPU, same XLA program: equal to rounding in the summary, 1e-6 relative).
    rerun = train_main(["--config", str(workdir / "best.yaml"), "--workdir", str(tmp_path / "b")])
    assert rerun["final_eval_loss"] == pytest.approx(best.value, rel=1e-6)

    # Resume: the budget raised by one adds one trial to the same study.
    more = [first[0], "search.trials=6"]
    again = search.run(load(*more), workdir, path=TINY, overrides=more, progress=False)
    assert len(again.trials) == 6
    for old, new in zip(trials, again.trials[:5], strict=True):
        assert (old.number, old.params, old.value, old.state) == (
            new.number,
            new.params,
            new.value,
            new.state,
        )
    assert sorted(p.name for p in workdir.glob("trial_*")) == [f"trial_{n}" for n in range(6)]
    # The budget met: nothing runs.
    same = search.run(load(*more), workdir, path=TINY, overrides=more, progress=False)
    assert len(same.trials) == 6


def test_a_trial_left_running_is_marked_failed(tmp_path):
    cfg = load()
    study = search.open_study(cfg, tmp_path)
    study.ask()  # as a search killed mid-trial leaves it
    reopened = search.open_study(cfg, tmp_path)
    assert [t.state for t in reopened.trials] == [optuna.trial.TrialState.FAIL]


def test_a_stray_trial_directory_is_refused(tmp_path):
    (tmp_path / "trial_0").mkdir()  # from another study: fit would resume its checkpoint
    with pytest.raises(ConfigError, match="trial_0 exists"):
        search.run(load("search.trials=1"), tmp_path, path=TINY, overrides=["search.trials=1"])


BAD_SPACES = [
    ("optimizer.lr", {"log_uniform": [1e-4, 1e-1]}, "unknown config key"),
    ("nope.x", {"uniform": [0, 1]}, "no such section"),
    ("optimizer.learning_rate", {"log_uniform": [1e-1, 1e-4]}, "low < high"),
    ("optimizer.learning_rate", {"log_uniform": [0, 1e-1]}, "low > 0"),
    ("optimizer.learning_rate", {"normal": [0, 1]}, "expected one of"),
    ("optimizer.learning_rate", {"uniform": [1e-3]}, "expected \\[low, high\\]"),
    ("optimizer.warmup_steps", {"int": [0, 2.5]}, "finite integer"),
    ("optimizer.name", {"categorical": ["adamw", "adamz"]}, "unknown optimizer"),
    ("optimizer.options.nesterov", {"categorical": [True]}, "no such option"),
    ("data.batch_size", {"int": [0, 8]}, "data.batch_size must be >= 1"),
    ("optimizer.warmup_steps", {"int": [0, 50]}, "longer than the run"),
    ("model.kind.x", {"categorical": [1]}, "not a mapping"),
]


@pytest.mark.parametrize(("key", "spec", "reason"), BAD_SPACES)
def test_bad_search_space_names_the_key(key, spec, reason):
    cfg = dataclasses.replace(load(), search=config.SearchConfig(space={key: spec}))
    with pytest.raises(ConfigError, match=reason) as info:
        search.search_space(cfg, TINY)
    assert f"search.space.{key}" in str(info.value)


def test_bad_search_section_at_load():
    with pytest.raises(ConfigError, match="search.sampler"):
        load("search.sampler=grid")
    with pytest.raises(ConfigError, match="search.trials"):
        load("search.trials=0")


def test_cli_bad_space_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        search.main(
            [
                "--config",
                str(TINY),
                'search.space.optimizer.learning_rate={"log_uniform": [1, 0.1]}',
                "--workdir",
                str(tmp_path),
            ]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: search.space.optimizer.learning_rate") and err.count("\n") == 1
