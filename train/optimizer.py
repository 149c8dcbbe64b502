"""The optimizer of a run, from its config: schedule, clipping, decay mask, optim_jax optimizer."""

from __future__ import annotations

import inspect

import optax

import optim_jax
from train.config import ConfigError, OptimizerConfig

OPTIMIZERS = {
    name: getattr(optim_jax, name)
    for name in (
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
}


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optim_jax.Schedule:
    """The learning-rate schedule named by ``optimizer.schedule`` over ``total_steps`` updates."""
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_lr_fraction
    warmup = min(cfg.warmup_steps, total_steps)
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


def make_optimizer(
    cfg: OptimizerConfig, schedule: optim_jax.Schedule
) -> optax.GradientTransformation:
    """``clip_by_global_norm`` (if set) then the named optimizer with ``cfg.options``."""
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(
            f"optimizer.name: unknown optimizer {cfg.name!r} (known: {', '.join(OPTIMIZERS)})"
        )
    factory = OPTIMIZERS[cfg.name]
    accepted = inspect.signature(factory).parameters
    for key in cfg.options:
        if key not in accepted or key == "learning_rate":
            raise ConfigError(
                f"optimizer.options.{key}: {cfg.name} takes no such option "
                f"(it takes: {', '.join(k for k in accepted if k != 'learning_rate')})"
            )
    options = dict(cfg.options)
    if cfg.decay_mask and "mask" in accepted and "mask" not in options:
        options["mask"] = optim_jax.decay_mask
    try:
        tx = factory(schedule, **options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"optimizer.options ({cfg.name}): {err}") from None
    if cfg.clip_norm is None:
        return tx
    if not cfg.clip_norm > 0:
        raise ConfigError(f"optimizer.clip_norm must be > 0 or null, got {cfg.clip_norm}")
    return optax.chain(optim_jax.clip_by_global_norm(cfg.clip_norm), tx)
