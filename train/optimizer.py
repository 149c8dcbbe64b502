"""The optimizer of a run, from its config: schedule, clipping, decay mask, optim_jax optimizer."""

from __future__ import annotations

import dataclasses
import inspect
import math

import jax
import optax

import optim_jax
from train import config
from train.config import ConfigError, OptimizerConfig

OPTIMIZERS = {name: getattr(optim_jax, name) for name in config.OPTIMIZER_NAMES}


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optim_jax.Schedule:
    """The learning-rate schedule named by ``optimizer.schedule`` over ``total_steps`` updates."""
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_lr_fraction
    uses_warmup = cfg.schedule in ("warmup_cosine_decay", "warmup_linear_decay", "inverse_sqrt")
    if uses_warmup and cfg.warmup_steps > total_steps:
        raise ConfigError(
            f"optimizer.warmup_steps={cfg.warmup_steps} is longer than the run "
            f"(run.steps={total_steps})"
        )
    warmup = cfg.warmup_steps
    builders = {
        "constant": lambda: optim_jax.constant(peak),
        "cosine_decay": lambda: optim_jax.cosine_decay(peak, total_steps, end),
        "warmup_cosine_decay": lambda: optim_jax.warmup_cosine_decay(
            0.0, peak, warmup, total_steps, end
        ),
        "warmup_linear_decay": lambda: optim_jax.warmup_linear_decay(
            peak, warmup, total_steps, end_value=end
        ),
        "inverse_sqrt": lambda: optim_jax.inverse_sqrt(peak, warmup),
        "one_cycle": lambda: optim_jax.one_cycle(peak, total_steps),
    }
    if cfg.schedule not in builders:
        raise ConfigError(
            f"optimizer.schedule: unknown schedule {cfg.schedule!r} (known: {', '.join(builders)})"
        )
    try:
        return builders[cfg.schedule]()
    except ValueError as err:
        raise ConfigError(f"optimizer ({cfg.schedule}): {err}") from None


def make_momentum_schedule(cfg: OptimizerConfig, total_steps: int) -> optim_jax.Schedule | None:
    """With ``optimizer.cycle_momentum``, torch OneCycleLR's momentum cycle over ``total_steps``.

    ``max_momentum -> base_momentum`` while the one-cycle learning rate rises,
    back to ``max_momentum`` while it falls (:func:`optim_jax.one_cycle_momentum`,
    on the phases of :func:`make_schedule`'s ``one_cycle``); None when off.
    """
    if not cfg.cycle_momentum:
        return None
    if cfg.schedule != "one_cycle":
        raise ConfigError(
            "optimizer.cycle_momentum needs optimizer.schedule=one_cycle (it cycles inversely "
            f"to the one-cycle learning rate), got optimizer.schedule={cfg.schedule!r}"
        )
    try:
        return optim_jax.one_cycle_momentum(total_steps, cfg.base_momentum, cfg.max_momentum)
    except ValueError as err:
        raise ConfigError(f"optimizer.base_momentum / optimizer.max_momentum: {err}") from None


def _with_momentum(cfg: OptimizerConfig, momentum: optim_jax.Schedule) -> OptimizerConfig:
    """``cfg`` whose options pass ``momentum`` as the optimizer's ``momentum`` (or ``b1``)."""
    accepted = inspect.signature(OPTIMIZERS[cfg.name]).parameters
    # Only a hyperparameter typed ScalarOrSchedule takes a schedule (rmsprop's momentum does not).
    scheduled = [
        k for k in ("momentum", "b1") if k in accepted and "Schedule" in str(accepted[k].annotation)
    ]
    if not scheduled:
        raise ConfigError(
            f"optimizer.cycle_momentum: {cfg.name} has no scheduled momentum (or b1) to cycle; "
            "set optimizer.cycle_momentum=false"
        )
    key = scheduled[0]
    if key in cfg.options:
        raise ConfigError(
            f"optimizer.options.{key} is set, but optimizer.cycle_momentum sets it from "
            "optimizer.base_momentum and optimizer.max_momentum; drop one of them"
        )
    return dataclasses.replace(cfg, options={**cfg.options, key: momentum})


def _checked_options(cfg: OptimizerConfig, options: dict, where: str) -> dict:
    """``options`` for the named optimizer, each key checked against its signature."""
    accepted = inspect.signature(OPTIMIZERS[cfg.name]).parameters
    for key in options:
        if key not in accepted or key == "learning_rate":
            raise ConfigError(
                f"{where}.{key}: {cfg.name} takes no such option "
                f"(it takes: {', '.join(k for k in accepted if k != 'learning_rate')})"
            )
    # A mask from YAML can only be a constant: true/false/null; a list or a mapping would
    # fail as a pytree mismatch at the optimizer's init (optimizer.decay_mask sets the usual).
    if "mask" in options and not isinstance(options["mask"], bool | None):
        raise ConfigError(
            f"{where}.mask must be true, false or null (optimizer.decay_mask sets the usual "
            f"mask), got {options['mask']!r}"
        )
    options = dict(options)
    if cfg.decay_mask and "mask" in accepted and "mask" not in options:
        options["mask"] = optim_jax.decay_mask
    return options


def _build(cfg: OptimizerConfig, schedule: optim_jax.Schedule, options: dict, where: str):
    try:
        return OPTIMIZERS[cfg.name](schedule, **_checked_options(cfg, options, where))
    except ConfigError:
        raise  # already names its key
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where} ({cfg.name}): {err}") from None


def _group_labels(prefixes: list[str]):
    """A label function: each parameter's first matching path prefix, else ``"default"``."""

    def label(path: str) -> str:
        for prefix in prefixes:
            if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                return prefix
        return "default"

    return lambda params: jax.tree.map(label, optim_jax.param_paths(params))


def _scaled(schedule: optim_jax.Schedule, factor: float) -> optim_jax.Schedule:
    return lambda step: factor * schedule(step)


def _grouped(cfg: OptimizerConfig, schedule: optim_jax.Schedule) -> optax.GradientTransformation:
    groups: dict = {"default": _build(cfg, schedule, cfg.options, "optimizer.options")}
    for prefix, spec in cfg.groups.items():
        where = f"optimizer.groups.{prefix}"
        if not isinstance(prefix, str) or not prefix:
            raise ConfigError(
                f"{where}: a group's key must be a parameter path prefix, got {prefix!r}"
            )
        if spec is None:
            groups[prefix] = None
            continue
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: expected a mapping of options or null, got {spec!r}")
        spec = dict(spec)
        lr_scale = spec.pop("lr_scale", 1.0)
        number = isinstance(lr_scale, int | float) and not isinstance(lr_scale, bool)
        if not number or not 0 <= lr_scale < math.inf:
            raise ConfigError(f"{where}.lr_scale must be a finite number >= 0, got {lr_scale!r}")
        groups[prefix] = _build(cfg, _scaled(schedule, lr_scale), {**cfg.options, **spec}, where)
    return optim_jax.param_groups(groups, _group_labels(list(cfg.groups)))


def make_optimizer(
    cfg: OptimizerConfig,
    schedule: optim_jax.Schedule,
    momentum: optim_jax.Schedule | None = None,
) -> optax.GradientTransformation:
    """``clip_by_global_norm`` (if set), then the named optimizer: one, or one per group;
    wrapped by :func:`with_tuning_wrappers` (plateau, SAM, Lookahead) when configured.

    ``momentum``: the schedule of :func:`make_momentum_schedule`, required when
    ``optimizer.cycle_momentum`` is on.
    """
    config.check_optimizer_name(cfg.name)  # an OptimizerConfig need not come from config.load
    if cfg.cycle_momentum:
        if momentum is None:
            raise ValueError("optimizer.cycle_momentum is on: pass make_momentum_schedule(...)")
        cfg = _with_momentum(cfg, momentum)
    if cfg.groups:
        tx = _grouped(cfg, schedule)
    else:
        tx = _build(cfg, schedule, cfg.options, "optimizer.options")
    if cfg.clip_norm is None:
        return with_tuning_wrappers(cfg, tx)
    if not cfg.clip_norm > 0:
        raise ConfigError(f"optimizer.clip_norm must be > 0 or null, got {cfg.clip_norm}")
    return with_tuning_wrappers(cfg, optax.chain(optim_jax.clip_by_global_norm(cfg.clip_norm), tx))


def with_tuning_wrappers(
    cfg: OptimizerConfig, tx: optax.GradientTransformation
) -> optax.GradientTransformation:
    """``tx`` inside reduce-on-plateau, SAM and Lookahead, each only when the config asks.

    Innermost first: the plateau scale multiplies ``tx``'s updates (so it scales the
    learning rate, as torch's scheduler does); SAM runs the whole optimizer (clipping
    included) on the gradient at the perturbed point, which the train step supplies as
    ``grad_fn``; Lookahead's fast weights take those SAM steps.
    """
    if cfg.plateau_factor < 1:
        tx = optax.chain(
            tx,
            optim_jax.reduce_on_plateau(
                cfg.plateau_factor,
                cfg.plateau_patience,
                cfg.plateau_threshold,
                cfg.plateau_cooldown,
                cfg.plateau_min_scale,
            ),
        )
    if cfg.sam_rho > 0:
        tx = optim_jax.sam(tx, cfg.sam_rho, cfg.sam_adaptive)
    if cfg.lookahead_steps > 0:
        tx = optim_jax.lookahead(tx, cfg.lookahead_steps, cfg.lookahead_alpha)
    return tx
