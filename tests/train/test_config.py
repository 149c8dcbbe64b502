"""train.config: YAML + ``key=value`` overrides -> frozen, type-checked dataclasses.

Every key is checked against the dataclasses and every value against its field's type before
anything runs; the error names the dotted key (and the file, when there is one).
"""

from __future__ import annotations

import dataclasses
import pathlib

import pytest
import yaml

from train import config
from train.config import Config, ConfigError

REPO = pathlib.Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "configs").glob("*.yaml"))


def test_defaults():
    assert config.load(None) == Config()
    assert config.load() == Config()


def test_overrides_are_typed_from_yaml():
    cfg = config.load(
        None,
        [
            "optimizer.learning_rate=1e-3",  # a float, as YAML 1.2 reads it (1.1 says string)
            "model.d_model=96",
            "model.remat=true",
            "optimizer.clip_norm=null",
            "optimizer.options={b1: 0.8, b2: 0.95}",
            "optimizer.options.eps=1e-6",  # merged into the mapping above
            "data.path=/tmp/corpus.txt",
            "mesh.data=-1",
        ],
    )
    assert cfg.optimizer.learning_rate == 0.001 and isinstance(cfg.optimizer.learning_rate, float)
    assert cfg.model.d_model == 96 and cfg.model.remat is True
    assert cfg.optimizer.clip_norm is None
    assert cfg.optimizer.options == {"b1": 0.8, "b2": 0.95, "eps": 1e-6}
    assert cfg.data.path == "/tmp/corpus.txt" and cfg.mesh.data == -1
    # Untouched fields keep their defaults.
    assert cfg.model.n_heads == Config().model.n_heads


def test_an_int_is_accepted_for_a_float_and_the_last_override_wins():
    cfg = config.load(None, ["optimizer.learning_rate=1", "model.d_model=32", "model.d_model=48"])
    assert cfg.optimizer.learning_rate == 1.0 and isinstance(cfg.optimizer.learning_rate, float)
    assert cfg.model.d_model == 48


def test_file_then_overrides(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "model: {d_model: 64, n_layers: 2}\noptimizer:\n  name: lion\n  learning_rate: 3e-4\n"
    )
    cfg = config.load(path, ["model.n_layers=3"])
    assert (cfg.model.d_model, cfg.model.n_layers) == (64, 3)
    assert cfg.optimizer.name == "lion" and cfg.optimizer.learning_rate == 3e-4
    assert config.load(str(path)).model.n_layers == 2  # a str path works too


def test_empty_file_is_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert config.load(path) == Config()


@pytest.mark.parametrize(
    "override, message",
    [
        ("modle.d_model=64", r"unknown config key modle \(known: checkpoint, data, mesh"),
        ("model.d_modle=64", r"unknown config key model\.d_modle \(known: .*d_model"),
        ("optimizer.lerning_rate=1e-3", r"unknown config key optimizer\.lerning_rate"),
        ("model=3", r"model: expected a mapping, got 3"),
        ("model.d_model=64.5", r"model\.d_model: expected int, got float 64\.5"),
        ("model.d_model=true", r"model\.d_model: expected int, got bool True"),
        ("model.d_model=abc", r"model\.d_model: expected int, got str 'abc'"),
        ("model.remat=1", r"model\.remat: expected bool, got int 1"),
        ("model.attention=flash", r"model\.attention must be one of auto, xla, cudnn, got 'flash'"),
        ("optimizer.learning_rate=fast", r"optimizer\.learning_rate: expected float, got str"),
        ("optimizer.clip_norm=big", r"optimizer\.clip_norm: expected float, got str 'big'"),
        ("optimizer.options=[1, 2]", r"optimizer\.options: expected dict, got list"),
        ("data.path=3", r"data\.path: expected str, got int 3"),
        ("model.d_model=", r"model\.d_model: expected int, got NoneType None"),
        ("model.d_model", r"override 'model\.d_model' is not of the form key=value"),
        ("=3", r"override '=3' is not of the form key=value"),
        ("model.d_model=[1", r"override 'model\.d_model=\[1': value is not valid YAML"),
    ],
)
def test_bad_override_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        config.load(None, [override])


def test_errors_in_a_file_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run: {stepz: 10}\n")
    with pytest.raises(ConfigError, match=rf"unknown config key run\.stepz .*\(in {path}\)"):
        config.load(path)
    path.write_text("run: {steps: [1\n")
    with pytest.raises(ConfigError, match=rf"config file {path} is not valid YAML"):
        config.load(path)
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=rf"cannot read config file {missing}"):
        config.load(missing)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"config: expected a mapping"):
        config.load(path)


def test_config_is_frozen():
    cfg = config.load(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.d_model = 3  # type: ignore[misc]


def test_to_dict_round_trips_through_yaml(tmp_path):
    cfg = config.load(None, ["optimizer.options={b1: 0.8}", "mesh.fsdp=2", "model.n_layers=3"])
    path = tmp_path / "dumped.yaml"
    path.write_text(yaml.safe_dump(config.to_dict(cfg)))
    assert config.load(path) == cfg


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads(recipe):
    cfg = config.load(recipe)
    assert cfg.run.steps >= 1 and cfg.data.batch_size >= 1
