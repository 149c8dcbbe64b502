"""Fuzzed configs end in a clean ``ConfigError`` or a valid run, never a traceback (issue 4).

What is proved here (hypothesis, derandomized, so every run tries the same examples):

* ``train.config.load`` with random overrides (known and unknown dotted keys; ints incl. 0,
  negatives and beyond int32, floats incl. nan/inf/-0.0, strings, YAML lists, mappings, null,
  booleans, empty values and broken YAML) and random YAML files (any top-level type, unknown
  sections, odd keys, bytes that are not UTF-8) returns a ``Config`` or raises ``ConfigError``
  whose message is one line and names the override's key;
* every crash found while writing this file stays a ``ConfigError`` naming its key (regressions);
* (slow) ``train.loop.build`` on fuzzed tiny configs (optimizer, schedule, mesh, sizes, model
  kind and data source, precision) succeeds or raises ``ConfigError``;
* (slow) ``python -m train`` with a bad config exits 2 with one ``error:`` line naming the key
  and no traceback; a tiny valid run exits 0.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
import subprocess
import sys
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.train.recipes import REPO, subprocess_env
from train import config, loop
from train.config import Config, ConfigError

# Every known dotted key, from the dataclasses themselves, plus sections and unknown keys.
KNOWN_KEYS = [
    f"{section}.{field.name}"
    for section, section_type in typing.get_type_hints(Config).items()
    for field in dataclasses.fields(section_type)
]
KEYS = st.one_of(
    st.sampled_from(KNOWN_KEYS),
    st.sampled_from(
        [
            "model",
            "run",
            "nope.x",
            "a.b.c",
            "model.nope",
            "mesh.rules.embed",
            "optimizer.options.b1",
            "optimizer.groups.blocks",
            "model.d_model.x",
        ]
    ),
    st.from_regex(r"[a-z_]{1,8}(\.[a-z_0-9]{1,8}){0,2}", fullmatch=True),
)

# Plain data YAML can hold, nested a little: what a careless hand writes in a config file.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2, 3, 8, 16, 2**31, -(2**31) - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([-0.0, math.nan, math.inf, -math.inf, 1e-3, 0.5, 1e300]),
    st.text(max_size=12),
    st.sampled_from(["adamw", "sgd", "gpt", "cnn", "shapes", "float16", "tensor", "one_cycle"]),
)
DATA = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.one_of(st.text(max_size=8), st.integers(), st.none()), inner, max_size=3
        ),
    ),
    max_leaves=8,
)
# Raw value text: YAML of random data (one line, flow style) or hand-picked garbage.
GARBAGE = st.sampled_from(
    [
        "",
        "[",
        "{",
        "]",
        "}",
        "{a: ",
        ":",
        "- -",
        "&a 1",
        "*a",
        "!!float x",
        "!!int x",
        "!!timestamp 2020-13-45",
        "!!timestamp x",
        "!!binary '!!!'",
        "!!python/name:os.system",
        "? [1]",
        "|",
        ">",
        "---",
        "...",
        "%YAML",
        "a=b",
        "'unclosed",
        "\t",
        "\x00",
        "[" * 1200,
        "1e999",
        ".nan",
        "-.inf",
        "0x10",
        "1_000",
        "2020-01-01",
        "~",
        "yes",
        "no",
    ]
)
VALUES = st.one_of(
    GARBAGE,
    DATA.map(
        lambda v: (
            yaml.safe_dump(v, default_flow_style=True, width=10**6)
            .strip()
            .removesuffix("\n...")
            .removesuffix("...")
            .strip()
        )
    ),
    st.text(max_size=10),
)
OVERRIDES = st.builds(lambda key, value: f"{key}={value}", KEYS, VALUES)

FUZZ = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def load_or_error(path: pathlib.Path | None, overrides: list[str]) -> Config | ConfigError:
    """``load``'s result, or the ConfigError it raised; any other exception fails the test."""
    try:
        return config.load(path, overrides)
    except ConfigError as err:
        assert str(err), "a ConfigError without a message"
        assert "\n" not in str(err), f"the CLI prints one line, got {str(err)!r}"
        return err


# --------------------------------------------------------------------------------- load


@settings(FUZZ, max_examples=300)
@given(key=KEYS, value=VALUES)
def test_one_override_loads_or_names_its_key(key, value):
    result = load_or_error(None, [f"{key}={value}"])
    if isinstance(result, ConfigError):
        # The first part of the key is in the message: the section, the unknown name, or the
        # override quoted whole (for bad YAML).
        assert key.split(".")[0] in str(result), (key, value, str(result))
    else:
        assert isinstance(result, Config)


@settings(FUZZ, max_examples=200)
@given(overrides=st.lists(OVERRIDES, max_size=4))
def test_several_overrides_load_or_raise_config_error(overrides):
    result = load_or_error(None, overrides)
    assert isinstance(result, Config | ConfigError)


SECTION_NAMES = st.sampled_from([f.name for f in dataclasses.fields(Config)] + ["nope", 1, None])
FILES = st.one_of(
    DATA,  # any top-level type
    st.dictionaries(SECTION_NAMES, DATA, max_size=3),  # sections holding anything
    st.dictionaries(
        SECTION_NAMES,
        st.dictionaries(
            st.sampled_from([k.split(".")[1] for k in KNOWN_KEYS] + ["nope"]), SCALARS, max_size=3
        ),
        max_size=3,
    ),  # sections holding real keys with random values
)


@settings(FUZZ, max_examples=100)
@given(content=FILES, overrides=st.lists(OVERRIDES, max_size=2))
def test_random_yaml_files_load_or_raise_config_error(tmp_path, content, overrides):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(content))
    result = load_or_error(path, overrides)
    if isinstance(result, ConfigError) and not overrides:
        assert str(path) in str(result)  # a file's errors name the file


@settings(FUZZ, max_examples=60)
@given(raw=st.one_of(st.binary(max_size=40), GARBAGE.map(str.encode)))
def test_raw_bytes_as_a_file_load_or_raise_config_error(tmp_path, raw):
    path = tmp_path / "raw.yaml"
    path.write_bytes(raw)
    result = load_or_error(path, [])
    if isinstance(result, ConfigError):
        assert str(path) in str(result)


# Crashes found by the fuzzing above (each raised something other than ConfigError before
# its fix); the message must name the key or the file.
LOAD_CRASHES = {
    "yaml_constructor_value_error": ([], ["model.d_model=!!float x"], r"model\.d_model"),
    "yaml_bad_timestamp": ([], ["run.seed=!!timestamp 2020-13-45"], r"run\.seed"),
    "int_beyond_int32": ([], ["run.seed=99999999999999999999"], r"run\.seed: .* int32"),
    "nan_learning_rate": ([], ["optimizer.learning_rate=.nan"], r"optimizer\.learning_rate"),
    "float32_overflow": ([], ["precision.initial_scale=1e300"], r"precision\.initial_scale"),
    "negative_mlp_ratio": ([], ["model.mlp_ratio=-1"], r"model\.mlp_ratio must be >= 1"),
    "empty_key_part": ([], ["model..d_model=3"], r"empty part"),
}


@pytest.mark.parametrize("name", LOAD_CRASHES)
def test_load_crashes_found_by_fuzzing_are_config_errors(name):
    _, overrides, message = LOAD_CRASHES[name]
    with pytest.raises(ConfigError, match=message):
        config.load(None, overrides)


def test_yaml_nested_beyond_the_recursion_limit_is_a_config_error():
    """A RecursionError inside PyYAML before its fix (deeper than the limit now in force)."""
    depth = 2 * sys.getrecursionlimit()
    with pytest.raises(ConfigError, match=r"model\.d_model.*RecursionError"):
        config.load(None, ["model.d_model=" + "[" * depth + "]" * depth])


@pytest.mark.parametrize(
    "content, overrides",
    [
        (b"[1, 2]\n", ["model.d_model=3"]),  # TypeError merging an override into a list
        (b"'x'\n", ["model.d_model=3"]),  # ValueError merging into a string
        (b"{1: 2, a: 3}\n", []),  # TypeError sorting int and str keys
        (b"\xff\xfe bad", []),  # UnicodeDecodeError
        (b"!!timestamp x\n", []),  # AttributeError inside PyYAML
    ],
)
def test_file_crashes_found_by_fuzzing_are_config_errors(tmp_path, content, overrides):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"\(in {path}\)|config file {path}"):
        config.load(path, overrides)


# -------------------------------------------------------------------------------- build

# Tiny everything, so that a build takes about a second; the fuzzed overrides come after.
TINY = [
    "model.n_layers=1",
    "model.d_model=32",
    "model.n_heads=2",
    "model.seq_len=16",
    "model.hidden=16",
    "model.channels=4",
    "model.image_size=8",
    "data.batch_size=16",
    "data.max_bytes=200000",
    "run.eval_batches=1",
    "run.steps=4",
    "optimizer.warmup_steps=1",
    "precision.compute=float32",
    "run.plot=false",
]

BUILD_CRASHES = {
    # mesh.rules unknown, doubled: JAX ValueError / DuplicateSpecError before.
    "unknown_rule": (["mesh.rules={1: fsdp}"], r"mesh\.rules\.1: unknown logical axis"),
    "rules_twice_on_one_param": (
        ["mesh.rules={embed: tensor, vocab: tensor, heads: tensor, mlp: tensor, kv: null}"],
        r"mesh\.rules\.vocab and mesh\.rules\.embed are both 'tensor'",
    ),
    # A mesh axis that does not divide a parameter: jax IndivisibleError before.
    "tensor_vs_heads": (["mesh.data=1", "mesh.tensor=8"], r"mesh\.tensor=8 .* model\.n_heads=2"),
    "tensor_vs_cnn_channels": (
        ["model.kind=cnn", "data.source=shapes", "mesh.data=1", "mesh.tensor=8"],
        r"mesh\.tensor=8 .* model\.channels",
    ),
    "fsdp_vs_mlp_hidden": (
        [
            "model.kind=mlp",
            "data.source=shapes",
            "model.n_layers=2",
            "model.hidden=12",
            "mesh.data=1",
            "mesh.fsdp=8",
        ],
        r"mesh\.fsdp=8 .* model\.hidden=12",
    ),
    # MemoryError drawing 12,000 images of 1000 x 1000 pixels.
    "huge_images": (
        ["model.kind=cnn", "data.source=shapes", "model.image_size=1000"],
        r"model\.image_size=1000",
    ),
    "int_group_prefix": (["optimizer.groups={1: {lr_scale: 2}}"], r"optimizer\.groups\.1"),
    "list_mask": (["optimizer.options={mask: [1]}"], r"optimizer\.options\.mask"),
    "nan_lr_scale": (["optimizer.groups={blocks: {lr_scale: .nan}}"], r"lr_scale"),
}


@pytest.mark.parametrize("name", BUILD_CRASHES)
def test_build_crashes_found_by_fuzzing_are_config_errors(name):
    overrides, message = BUILD_CRASHES[name]
    with pytest.raises(ConfigError, match=message):
        loop.build(config.load(None, [*TINY, *overrides]))


OPTIMIZER_NAMES = ["sgd", "adamw", "lamb", "lars", "lion", "adafactor", "sophia", "adamx"]
SCHEDULES = ["constant", "cosine_decay", "warmup_cosine_decay", "inverse_sqrt", "one_cycle", "x"]
BUILD_FIELDS = {
    "optimizer.name": st.sampled_from(OPTIMIZER_NAMES),
    "optimizer.schedule": st.sampled_from(SCHEDULES),
    "optimizer.learning_rate": st.sampled_from(["0", "-1", "1e-3", "10", "1e40", ".inf"]),
    "optimizer.warmup_steps": st.sampled_from(["0", "1", "3", "100", "-2"]),
    "optimizer.end_lr_fraction": st.sampled_from(["0", "0.1", "1", "-0.5", "2"]),
    "optimizer.clip_norm": st.sampled_from(["null", "0", "1.0", "-1"]),
    "optimizer.options": st.sampled_from(
        [
            "{}",
            "{b1: 0.5}",
            "{b1: 2}",
            "{momentum: 0.9}",
            "{weight_decay: -1}",
            "{eps: x}",
            "{nope: 1}",
            "{mask: false}",
            "[1]",
        ]
    ),
    "optimizer.cycle_momentum": st.sampled_from(["false", "true"]),
    "optimizer.accumulation_steps": st.sampled_from(["1", "2", "0", "-1"]),
    "mesh.data": st.sampled_from(["-1", "1", "2", "3", "8", "0"]),
    "mesh.fsdp": st.sampled_from(["1", "2", "-1", "4"]),
    "mesh.tensor": st.sampled_from(["1", "2", "4", "-1"]),
    "data.batch_size": st.sampled_from(["8", "16", "12", "1", "0"]),
    "model.seq_len": st.sampled_from(["8", "16", "0", "100000"]),
    "model.n_heads": st.sampled_from(["1", "2", "3", "4", "0"]),
    "model.d_model": st.sampled_from(["16", "24", "32", "0"]),
    "model.vocab_size": st.sampled_from(["256", "100", "258", "0"]),
    "model.kind": st.sampled_from(["gpt", "cnn", "mlp", "rnn"]),
    "data.source": st.sampled_from(["embedded", "shapes", "text", "nope"]),
    "precision.compute": st.sampled_from(["float32", "bfloat16", "float16", "int8"]),
    "precision.loss_scale": st.sampled_from(["auto", "dynamic", "none", "x"]),
}


@pytest.mark.slow
@settings(FUZZ, max_examples=15)
@given(chosen=st.fixed_dictionaries({}, optional=BUILD_FIELDS))
def test_fuzzed_tiny_configs_build_or_raise_config_error(chosen):
    overrides = [*TINY, *(f"{k}={v}" for k, v in chosen.items())]
    try:
        cfg = config.load(None, overrides)
    except ConfigError:
        return
    try:
        setup = loop.build(cfg)
    except ConfigError as err:
        assert str(err) and "\n" not in str(err)
        return
    assert setup.cfg is cfg


# ----------------------------------------------------------------------------- the CLI


def run_cli(workdir: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "train", *args, "--workdir", str(workdir)]
    return subprocess.run(
        cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["model.nope=1"], r"unknown config key model\.nope"),
        (["--config", "{list_file}"], r"config: expected a mapping .*list\.yaml"),
        (["mesh.data=3"], r"mesh \{'data': 3, .*has 3 devices but JAX sees 8"),
        (["optimizer.name=adamx"], r"optimizer\.name: unknown optimizer 'adamx'"),
    ],
    ids=["unknown_key", "non_mapping_yaml", "mesh_not_dividing", "bad_optimizer"],
)
def test_cli_bad_config_exits_2_with_one_error_line(tmp_path, args, message):
    list_file = tmp_path / "list.yaml"
    list_file.write_text("- model\n- run\n")
    args = [a.format(list_file=list_file) for a in args]
    result = run_cli(tmp_path / "run", *TINY, *args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert re.search(message, errors[0]), errors[0]


@pytest.mark.slow
def test_cli_tiny_valid_run_exits_0(tmp_path):
    result = run_cli(tmp_path / "run", *TINY, "run.steps=2", "run.eval_every=2")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "after 2 steps" in result.stdout, result.stdout
