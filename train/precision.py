"""Mixed precision: float32 master weights, a compute dtype, and dynamic loss scaling.

The step keeps parameters and optimizer state in float32 and runs the model in
``compute`` (layers get ``dtype=compute, param_dtype=float32``, so gradients
arrive in float32). float16 needs loss scaling: the loss is multiplied by
``scale`` before the backward pass and the gradients divided by it after; a
step whose gradients are not finite is skipped and halves the scale, and
``growth_interval`` finite steps in a row double it (Micikevicius et al. 2018).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from train.config import ConfigError, PrecisionConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


MAX_SCALE = 2.0**64  # far above any useful scale, far below float32's overflow


class LossScale(NamedTuple):
    scale: jax.Array  # float32 scalar; 1 when scaling is off
    finite_steps: jax.Array  # int32: finite steps since the last change


def compute_dtype(cfg: PrecisionConfig) -> jnp.dtype:
    if cfg.compute not in DTYPES:
        raise ConfigError(f"precision.compute must be one of {sorted(DTYPES)}, got {cfg.compute!r}")
    return DTYPES[cfg.compute]


def uses_dynamic_scale(cfg: PrecisionConfig) -> bool:
    if cfg.loss_scale not in ("auto", "dynamic", "none"):
        raise ConfigError(
            f"precision.loss_scale must be 'auto', 'dynamic' or 'none', got {cfg.loss_scale!r}"
        )
    if cfg.loss_scale == "auto":
        return cfg.compute == "float16"
    return cfg.loss_scale == "dynamic"


def initial_loss_scale(cfg: PrecisionConfig) -> LossScale:
    scale = cfg.initial_scale if uses_dynamic_scale(cfg) else 1.0
    if not scale > 0:
        raise ConfigError(f"precision.initial_scale must be > 0, got {scale}")
    return LossScale(jnp.asarray(scale, jnp.float32), jnp.zeros([], jnp.int32))


def next_loss_scale(cfg: PrecisionConfig, state: LossScale, grads_finite: jax.Array) -> LossScale:
    """Halve on overflow; double after ``growth_interval`` finite steps; fixed when off."""
    if not uses_dynamic_scale(cfg):
        return state
    grown = state.finite_steps + 1 >= cfg.growth_interval
    # Doubling stops below float32's largest value: an infinite scale would skip every step.
    doubled = jnp.minimum(state.scale * 2.0, MAX_SCALE)
    scale = jnp.where(grads_finite, jnp.where(grown, doubled, state.scale), state.scale / 2.0)
    finite_steps = jnp.where(grads_finite & ~grown, state.finite_steps + 1, 0)
    return LossScale(jnp.maximum(scale, 1.0).astype(jnp.float32), finite_steps.astype(jnp.int32))
