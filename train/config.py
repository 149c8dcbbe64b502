"""Typed, frozen configuration: YAML file -> dataclasses, with ``key=value`` overrides.

Every key is checked against the dataclass fields and every value against the
field's type before anything runs, and errors name the dotted key
(``optimizer.learning_rate``) and the file they came from.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
import types
import typing
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """YAML 1.1's safe loader, but with YAML 1.2's floats (``1e-3``) and booleans (only
    true/false: ``run.distributed: on`` is the string "on", not True)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)
_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in _Loader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _parse_yaml(text: str, what: str) -> Any:
    """``text`` parsed, or a ConfigError saying ``what`` is not valid YAML.

    Besides ``yaml.YAMLError``, PyYAML's constructors let through ValueError
    (``!!int x``, ``!!timestamp 2020-13-45``), AttributeError (``!!timestamp x``) and
    RecursionError (deeply nested flow collections): all of them mean bad YAML.
    """
    try:
        return _yaml(text)
    except (yaml.YAMLError, ValueError, TypeError, AttributeError, RecursionError) as err:
        reason = str(err) if isinstance(err, yaml.YAMLError) else f"{type(err).__name__}: {err}"
        # PyYAML's messages span lines (a caret under the bad column); the CLI prints one line.
        raise ConfigError(f"{what} is not valid YAML ({' '.join(reason.split())})") from None


class ConfigError(ValueError):
    """A configuration problem; the message names the key, file or number at fault."""


# Integers end up in int32 device arrays (step counters, seeds, sizes: JAX runs without x64)
# and floats in float32 ones (learning rate, loss scale): values beyond those ranges would
# overflow deep inside a run instead of failing here.
INT_RANGE = (-(2**31), 2**31 - 1)
FLOAT32_MAX = 3.4028234663852886e38  # numpy.finfo(numpy.float32).max
# Float keys where +inf is meaningful ("never"): a spike factor of inf never flags a spike.
INFINITY_ALLOWED = ("run.spike_factor", "run.loss_spike_factor")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """``kind``: ``gpt`` (train/models/gpt.py) or the image classifiers ``cnn`` and ``mlp``
    (train/models/vision.py)."""

    kind: str = "gpt"
    vocab_size: int = 256
    seq_len: int = 128
    d_model: int = 128
    n_layers: int = 4  # gpt: blocks; cnn: conv stages (each halves the image); mlp: hidden layers
    n_heads: int = 4
    mlp_ratio: int = 4
    remat: bool = False
    # gpt's attention kernel (train/models/gpt.py): "xla" (written out, every backend), "cudnn"
    # (jax.nn.dot_product_attention's fused flash kernel: NVIDIA GPUs, bf16/fp16 compute) or
    # "auto" (cudnn where it can run, else xla).
    attention: str = "auto"
    # Image classifiers (cnn, mlp) on data.source=shapes:
    image_size: int = 16  # height and width of the square images
    num_classes: int = 4
    channels: int = 32  # cnn: channels of the first stage, doubled at each further stage
    hidden: int = 128  # width of the dense hidden layer(s)
    # Kernel initialisation (train/models/initializers.py): "default" keeps each model's own
    # (gpt normal 0.02 + GPT-2 scaled residual, cnn/mlp He normal); or one of INITS for every
    # dense and conv kernel, with ``init_mode`` (Kaiming's fan) and ``init_gain`` ("auto":
    # linear for Xavier, the model's activation for Kaiming).
    init: str = "default"
    init_mode: str = "fan_in"
    init_gain: str = "auto"


# logical axis name -> mesh axis (None: replicated along that dimension)
DEFAULT_RULES: dict[str, str | None] = {
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "mlp": "tensor",
    "kv": None,
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device counts along the named axes (-1: all remaining devices) and sharding rules."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    num_devices: int = -1  # use the first N devices JAX sees; -1: all of them
    rules: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_RULES))


@dataclasses.dataclass(frozen=True)
class PrecisionConfig:
    """Master weights and optimizer state stay float32; ``compute`` is the forward/backward."""

    compute: str = "bfloat16"  # "float32", "bfloat16" or "float16"
    loss_scale: str = "auto"  # "auto" (dynamic for float16, none otherwise), "dynamic", "none"
    initial_scale: float = 2.0**15
    growth_interval: int = 200  # finite steps before the scale doubles


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adamw"
    learning_rate: float = 3e-3
    schedule: str = "warmup_cosine_decay"  # or "constant", "one_cycle", ...
    warmup_steps: int = 40
    end_lr_fraction: float = 0.1
    options: dict = dataclasses.field(default_factory=dict)  # extra optimizer kwargs
    clip_norm: float | None = 1.0
    decay_mask: bool = True  # no weight decay on biases, norm scales, embeddings
    # With schedule one_cycle: cycle the optimizer's ``momentum`` (or ``b1``) inversely to the
    # learning rate, max -> base while it rises, back to max while it falls (torch OneCycleLR).
    cycle_momentum: bool = False
    base_momentum: float = 0.85
    max_momentum: float = 0.95
    # Parameter groups, torch-style: {path prefix: {option overrides, or lr_scale}}; a
    # parameter joins the first group whose prefix starts its path ("blocks/0/mlp"),
    # others keep the defaults. A group set to null is frozen.
    groups: dict = dataclasses.field(default_factory=dict)
    accumulation_steps: int = 1
    # Keep params and optimizer state in the flat multi-tensor layout (optim_jax.flat): a few
    # buffers per dtype and sharding instead of one array per tensor, so the update compiles
    # and runs as a few fused kernels whatever the model's tensor count (for Adafactor a
    # buffer per tensor shape: its statistics see the layers' matrices as one stack).
    # Checkpoints stay per-leaf (interchangeable with runs without it); groups and int8
    # moments refuse it.
    flat_layout: bool = False
    # Wrappers (optim_jax.wrappers; README "Tuning and analysis"). SAM: the step's gradient is
    # taken again at params + rho g/||g|| (a second forward/backward per step); 0 = off;
    # sam_adaptive: ASAM's |w|-scaled neighbourhood. Lookahead: slow weights move
    # lookahead_alpha of the way to the fast ones every lookahead_steps steps; 0 = off.
    sam_rho: float = 0.0
    sam_adaptive: bool = False
    lookahead_steps: int = 0
    lookahead_alpha: float = 0.5
    # Reduce-on-plateau (torch ReduceLROnPlateau on the eval loss, mode min, relative
    # threshold): after plateau_patience evaluations without a plateau_threshold relative gain,
    # the learning rate is multiplied by plateau_factor (1.0 = off), not below plateau_min_scale
    # times the schedule's, then plateau_cooldown evaluations are ignored.
    plateau_factor: float = 1.0
    plateau_patience: int = 10
    plateau_threshold: float = 1e-4
    plateau_cooldown: int = 0
    plateau_min_scale: float = 0.0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where tokens come from; ``batch_size`` is the global batch of one micro-step."""

    source: str = "embedded"  # "embedded", "text" (a UTF-8/bytes file), "tokens" (.npy), "shapes"
    path: str | None = None
    max_bytes: int = 2_000_000  # of the embedded corpus
    eval_fraction: float = 0.1
    batch_size: int = 32


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100  # steps between asynchronous saves (and one at the end)
    keep: int = 3  # the newest ``keep`` checkpoints are kept, plus the best by eval loss
    keep_best: bool = True
    resume: str = "auto"  # "auto" (resume when the workdir has one), "never", "require"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    steps: int = 400
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    patience: int = 0  # evaluations without improvement before stopping; 0: never stop early
    spike_factor: float = 5.0  # warn when the grad norm exceeds this x its running median
    # A loss spike: a finite loss above ``loss_spike_factor`` x the median of the last
    # ``spike_window`` losses. ``spike_policy``: "warn" (log it, keep the update), "skip"
    # (discard that step's update, as for a non-finite gradient), "rollback" (return to the
    # newest checkpoint and train on without the offending batch; at most ``max_rollbacks``
    # times, then as "skip").
    spike_policy: str = "warn"
    loss_spike_factor: float = 2.0
    spike_window: int = 32
    max_rollbacks: int = 5
    distributed: str = "auto"  # "auto" (from the environment), "on", "off"
    # Sharpness in the metrics (optim_jax.hessian): every ``sharpness_every`` steps (0: never),
    # ``sharpness`` (top Hessian eigenvalue, Lanczos with ``sharpness_iters`` steps) and
    # ``hessian_trace`` (Hutchinson, ``sharpness_iters`` probes) of that step's first micro-batch.
    sharpness_every: int = 0
    sharpness_iters: int = 20
    # Draw metrics.png at the end of the run: about a second of matplotlib, worth turning off
    # for many short runs (sweeps, tests) whose metrics.jsonl is read by a program.
    plot: bool = True


@dataclasses.dataclass(frozen=True)
class PBTConfig:
    """Population-based training (``python -m train.pbt``; Jaderberg et al. 2017).

    ``population`` copies of the run train together; every ``interval`` steps the worst
    ``quantile`` of them (by eval loss) copy the weights and optimizer state of a random member
    of the best ``quantile`` (exploit) and multiply each searched hyperparameter by a factor
    drawn from ``perturb`` (explore). ``hyperparams``: {``optimizer.learning_rate`` or
    ``optimizer.options.<name>``: {``log_uniform`` or ``uniform``: [low, high]} (the initial
    draw), optionally with ``min`` / ``max`` (bounds on explored values)}. ``exploit: false``
    trains the same population without exploit/explore (the baseline). ``shard_population``:
    members split over the mesh's ``data`` axis (each trains on the whole batch) instead of
    every member data-parallel over it. ``seed``: the numpy RNG of draws and choices.
    """

    population: int = 4
    interval: int = 10
    quantile: float = 0.25
    perturb: list = dataclasses.field(default_factory=lambda: [0.8, 1.25])
    hyperparams: dict = dataclasses.field(
        default_factory=lambda: {"optimizer.learning_rate": {"log_uniform": [1e-4, 1e-1]}}
    )
    exploit: bool = True
    shard_population: bool = False
    seed: int = 0


PBT_DISTRIBUTIONS = ("log_uniform", "uniform")
_PBT_SPEC_KEYS = frozenset((*PBT_DISTRIBUTIONS, "min", "max"))
_PBT_KEY = re.compile(r"optimizer\.(learning_rate|options\.[A-Za-z_][A-Za-z0-9_]*)")


@dataclasses.dataclass(frozen=True)
class SearchRange:
    """One entry of ``pbt.hyperparams``: initial values drawn from ``distribution`` over
    [``low``, ``high``]; explored values clipped to [``minimum``, ``maximum``]."""

    distribution: str
    low: float
    high: float
    minimum: float = -math.inf
    maximum: float = math.inf


def _pbt_number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a finite number, got {value!r}")
    if abs(value) > FLOAT32_MAX:
        raise ConfigError(f"{where}: {value!r} is beyond float32's range")
    return float(value)


def pbt_search_space(cfg: PBTConfig) -> dict[str, SearchRange]:
    """``pbt.hyperparams`` checked: {dotted key: SearchRange}, or a ConfigError naming the key.

    A key is dotted in YAML (``optimizer.learning_rate: {...}``) or nested, as an override
    ``pbt.hyperparams.optimizer.learning_rate.log_uniform=[1e-3,1]`` writes it; entries for the
    same key are merged, the later (the override) winning.
    """
    flat: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for name, value in node.items():
            key = f"{prefix}.{name}" if prefix else str(name)
            if isinstance(value, dict) and value and not _PBT_SPEC_KEYS & set(value):
                walk(value, key)
            elif isinstance(value, dict) and isinstance(flat.get(key), dict):
                flat[key] = {**flat[key], **value}
            else:
                flat[key] = value

    walk(cfg.hyperparams, "")
    if not flat:
        raise ConfigError("pbt.hyperparams is empty: name at least one hyperparameter to search")
    space = {}
    for key, spec in flat.items():
        if not _PBT_KEY.fullmatch(key):
            raise ConfigError(
                f"pbt.hyperparams: {key!r:.80} cannot be searched; only optimizer.learning_rate "
                "and optimizer.options.<name> can"
            )
        where = f"pbt.hyperparams.{key}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected {{log_uniform: [low, high]}}, got {spec!r:.80}")
        unknown = sorted(str(k) for k in spec if k not in _PBT_SPEC_KEYS)
        chosen = [name for name in PBT_DISTRIBUTIONS if name in spec]
        if unknown or len(chosen) != 1:
            raise ConfigError(
                f"{where}: expected exactly one of {', '.join(PBT_DISTRIBUTIONS)} (and optional "
                f"min, max), got keys {sorted(map(str, spec))}"
            )
        distribution, bounds = chosen[0], spec[chosen[0]]
        if not isinstance(bounds, list) or len(bounds) != 2:
            raise ConfigError(f"{where}.{distribution}: expected [low, high], got {bounds!r:.80}")
        low, high = (_pbt_number(f"{where}.{distribution}", b) for b in bounds)
        minimum = _pbt_number(f"{where}.min", spec["min"]) if "min" in spec else -math.inf
        maximum = _pbt_number(f"{where}.max", spec["max"]) if "max" in spec else math.inf
        if not minimum <= low <= high <= maximum:
            raise ConfigError(f"{where}: needs min <= low <= high <= max, got {spec!r:.80}")
        if distribution == "log_uniform" and not low > 0:
            raise ConfigError(f"{where}.log_uniform: low must be > 0, got {low}")
        space[key] = SearchRange(distribution, low, high, minimum, maximum)
    return space


def _check_pbt(cfg: PBTConfig) -> None:
    if not 0 < cfg.quantile <= 0.5:
        raise ConfigError(f"pbt.quantile must be in (0, 0.5], got {cfg.quantile}")
    if int(cfg.quantile * cfg.population) < 1:
        raise ConfigError(
            f"pbt.quantile={cfg.quantile} of pbt.population={cfg.population} replaces no member"
        )
    if not cfg.perturb:
        raise ConfigError("pbt.perturb must list at least one factor, e.g. [0.8, 1.25]")
    for index, factor in enumerate(cfg.perturb):
        if not _pbt_number(f"pbt.perturb[{index}]", factor) > 0:
            raise ConfigError(f"pbt.perturb[{index}] must be > 0, got {factor}")
    pbt_search_space(cfg)


SEARCH_SAMPLERS = ("tpe", "random")
SEARCH_PRUNERS = ("median", "none")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Bayesian hyperparameter search (``python -m train.search``, Optuna).

    ``space``: {dotted config key: {``log_uniform`` | ``uniform`` | ``int`` | ``log_int``:
    [low, high]} or {``categorical``: [choices]}}, checked by ``train.search.search_space``.
    ``trials``: the finished trials the study should hold (a rerun runs only the missing
    ones: raise it to add more). ``sampler``: ``tpe`` or ``random``, seeded by ``seed``.
    ``pruner``: ``median`` (stop a trial whose eval loss is above the median of earlier
    trials' at the same step) or ``none``. ``storage``: an Optuna database URL; null:
    ``sqlite:///<workdir>/search.db``.
    """

    space: dict = dataclasses.field(default_factory=dict)
    trials: int = 20
    sampler: str = "tpe"
    pruner: str = "median"
    storage: str | None = None
    study_name: str = "search"
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    precision: PrecisionConfig = dataclasses.field(default_factory=PrecisionConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    pbt: PBTConfig = dataclasses.field(default_factory=PBTConfig)
    search: SearchConfig = dataclasses.field(default_factory=SearchConfig)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """``value`` if it fits the annotation ``tp`` (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(key, value, option)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        value = float(value)
        if math.isnan(value):
            raise ConfigError(f"{key}: expected a number, got nan")
        if abs(value) > FLOAT32_MAX and not (value == math.inf and key in INFINITY_ALLOWED):
            raise ConfigError(f"{key}: {value!r} is beyond float32's range (+-{FLOAT32_MAX:.4g})")
        return value
    if tp is int and type(value) is int and not INT_RANGE[0] <= value <= INT_RANGE[1]:
        low, high = INT_RANGE
        raise ConfigError(f"{key}: {value} does not fit in int32 ({low} .. {high})")
    if tp in (int, str, bool) and type(value) is tp:
        return value
    if tp is dict and isinstance(value, dict):
        return dict(value)
    if tp is list and isinstance(value, list):
        return list(value)
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls: type, values: dict, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    # Sorted by repr: YAML keys may be ints, None or booleans, which do not sort with strings.
    unknown = sorted((name for name in values if name not in fields), key=repr)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]} (known: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value, key)
        else:
            kwargs[name] = _check_value(key, value, hints[name])
    return cls(**kwargs)


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict:
    """``"optimizer.learning_rate=1e-3"`` -> ``{"optimizer": {"learning_rate": 0.001}}``."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    if "" in key.split("."):
        raise ConfigError(f"override {text!r}: key {key!r} has an empty part")
    value = _parse_yaml(raw, f"override {text!r}: value") if raw else None
    nested: dict = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def load(path: str | pathlib.Path | None = None, overrides: list[str] = ()) -> Config:
    """The config of a YAML file (or the defaults) with ``key=value`` overrides applied."""
    values: dict = {}
    if path is not None:
        path = pathlib.Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {path} is not UTF-8 text ({err})") from None
        values = _parse_yaml(text, f"config file {path}")
        if values is None:  # an empty file (or only comments): the defaults
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(
                f"config: expected a mapping of sections (model:, optimizer:, ...), got "
                f"{type(values).__name__} {values!r:.80} (in {path})"
            )
    for text in overrides:
        values = _merge(values, parse_override(text))
    try:
        config = _build(Config, values, "")
        _check_ranges(config)
        return config
    except ConfigError as err:
        raise ConfigError(f"{err} (in {path})" if path else str(err)) from None


SPIKE_POLICIES = ("warn", "skip", "rollback")
# optim_jax's optimizers by name (train/optimizer.py builds them); checked here, before JAX loads.
OPTIMIZER_NAMES = (
    "sgd",
    "adagrad",
    "rmsprop",
    "adam",
    "adamw",
    "lamb",
    "lars",
    "lion",
    "adafactor",
    "sophia",
)
INITS = ("default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")
INIT_MODES = ("fan_in", "fan_out")
INIT_GAINS = ("auto", "linear", "relu", "gelu")
ATTENTIONS = ("auto", "xla", "cudnn")

# (dotted key, smallest allowed value): counts and cadences whose zero or negative values
# would fail deep inside a run (division by zero, a stop at the first evaluation).
_MINIMUMS = (
    ("run.steps", 1),
    ("run.log_every", 1),
    ("run.eval_every", 1),
    ("run.eval_batches", 1),
    ("run.patience", 0),
    ("run.spike_window", 1),
    ("run.max_rollbacks", 0),
    ("run.sharpness_every", 0),
    ("run.sharpness_iters", 2),  # a standard error needs two probes
    ("checkpoint.every", 0),
    ("checkpoint.keep", 1),
    ("precision.growth_interval", 1),
    ("optimizer.warmup_steps", 0),
    ("optimizer.accumulation_steps", 1),
    ("optimizer.lookahead_steps", 0),
    ("optimizer.plateau_patience", 0),
    ("optimizer.plateau_cooldown", 0),
    ("data.batch_size", 1),
    ("model.n_layers", 1),
    ("model.n_heads", 1),
    ("model.d_model", 1),
    ("model.seq_len", 1),
    ("model.vocab_size", 1),
    ("model.mlp_ratio", 1),
    ("data.max_bytes", 1),
    ("pbt.population", 2),
    ("pbt.interval", 1),
    ("search.trials", 1),
)


def check_optimizer_name(name: str) -> None:
    if name not in OPTIMIZER_NAMES:
        raise ConfigError(
            f"optimizer.name: unknown optimizer {name!r} (known: {', '.join(OPTIMIZER_NAMES)})"
        )


def _check_ranges(config: Config) -> None:
    check_optimizer_name(config.optimizer.name)
    for key, minimum in _MINIMUMS:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value < minimum:
            raise ConfigError(f"{key} must be >= {minimum}, got {value}")
    for key in ("spike_factor", "loss_spike_factor"):
        value = getattr(config.run, key)
        if not value > 1:
            raise ConfigError(f"run.{key} must be > 1, got {value}")
    for key, choices in (
        ("init", INITS),
        ("init_mode", INIT_MODES),
        ("init_gain", INIT_GAINS),
        ("attention", ATTENTIONS),
    ):
        if getattr(config.model, key) not in choices:
            raise ConfigError(
                f"model.{key} must be one of {', '.join(choices)}, "
                f"got {getattr(config.model, key)!r}"
            )
    if config.run.spike_policy not in SPIKE_POLICIES:
        raise ConfigError(
            f"run.spike_policy must be one of {', '.join(SPIKE_POLICIES)}, "
            f"got {config.run.spike_policy!r}"
        )
    _check_pbt(config.pbt)
    for key, choices in (("sampler", SEARCH_SAMPLERS), ("pruner", SEARCH_PRUNERS)):
        if getattr(config.search, key) not in choices:
            raise ConfigError(
                f"search.{key} must be one of {', '.join(choices)}, "
                f"got {getattr(config.search, key)!r}"
            )
    _check_tuning_wrappers(config.optimizer)


# (key, low, high, low inclusive, high inclusive) of the optimizer wrappers' float settings.
_WRAPPER_RANGES = (
    ("sam_rho", 0.0, math.inf, True, False),
    ("lookahead_alpha", 0.0, 1.0, False, True),
    ("plateau_factor", 0.0, 1.0, False, True),
    ("plateau_threshold", 0.0, 1.0, True, False),
    ("plateau_min_scale", 0.0, 1.0, True, True),
)


def _check_tuning_wrappers(cfg: OptimizerConfig) -> None:
    for name, low, high, low_in, high_in in _WRAPPER_RANGES:
        value = getattr(cfg, name)
        above = value >= low if low_in else value > low
        below = value <= high if high_in else value < high
        if not (above and below):
            interval = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
            raise ConfigError(f"optimizer.{name} must be in {interval}, got {value}")


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)
