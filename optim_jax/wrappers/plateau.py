"""Reduce-on-plateau: a learning-rate scale that an evaluation metric lowers when it stalls."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optim_jax import base, validation

MODES = ("min", "max")
THRESHOLD_MODES = ("rel", "abs")


@dataclasses.dataclass(frozen=True)
class PlateauRule:
    """The hyperparameters of :func:`reduce_on_plateau` (see there); hashable and static."""

    factor: float
    patience: int
    threshold: float
    threshold_mode: str
    cooldown: int
    min_scale: float
    mode: str
    eps: float


@dataclasses.dataclass(frozen=True)
class PlateauState:
    """State of :func:`reduce_on_plateau`.

    A dataclass pytree rather than a NamedTuple so that the rule is static
    metadata (part of the tree's structure, not an array): :func:`observe_plateau`
    reads it from the state alone, it is neither traced nor checkpointed, and a
    resumed run uses the rule of its own configuration.

    Attributes:
      scale: the factor every update is multiplied by (1 at first).
      best: the best metric seen (+inf, or -inf in mode ``max``, at first).

    ``scale`` and ``best`` are in JAX's default float dtype when ``init`` runs: float64
    under ``jax_enable_x64`` (torch's numbers, which are Python floats, exactly),
    float32 otherwise (a metric's changes below float32's resolution of it, a relative
    2^-24, then go unseen).
      bad_evals: int32, observations since the last improvement (torch's
        ``num_bad_epochs``).
      cooldown_left: int32, observations still to ignore after a reduction.
      observations: int32, metrics observed so far.
      rule: the hyperparameters (static).
    """

    scale: jax.Array
    best: jax.Array
    bad_evals: jax.Array
    cooldown_left: jax.Array
    observations: jax.Array
    rule: PlateauRule


jax.tree_util.register_dataclass(
    PlateauState,
    data_fields=["scale", "best", "bad_evals", "cooldown_left", "observations"],
    meta_fields=["rule"],
)


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)
    validation.check_non_negative_int(name, value)
    return value


def reduce_on_plateau(
    factor: float = 0.1,
    patience: int = 10,
    threshold: float = 1e-4,
    cooldown: int = 0,
    min_scale: float = 0.0,
    *,
    mode: str = "min",
    threshold_mode: str = "rel",
    eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    """Multiplies updates by a scale that :func:`observe_plateau` lowers when a metric stalls.

    ``update`` returns ``scale * updates`` and leaves the state alone; the
    scale changes only through ``observe_plateau(opt_state, metric)``, called by
    the training loop after each evaluation, with torch's
    ``ReduceLROnPlateau.step`` semantics (defaults are torch's): an observation
    ``x`` improves on ``best`` if (mode ``min``) ``x < best (1 - threshold)``
    (``rel``) or ``x < best - threshold`` (``abs``), mirrored for ``max``. Then

    .. math::
        \\text{improved: } best \\leftarrow x,\\ bad \\leftarrow 0; \\quad
        \\text{else } bad \\leftarrow bad + 1; \\quad
        \\text{in cooldown: } cooldown \\leftarrow cooldown - 1,\\ bad \\leftarrow 0; \\\\
        bad > patience: \\ scale \\leftarrow \\max(scale \\cdot factor, min\\_scale)
        \\text{ (only if that lowers it by more than eps)},\\
        cooldown \\leftarrow cooldown_0,\\ bad \\leftarrow 0

    A NaN metric never improves. Placed as the last link of an optimizer's
    chain (after the learning rate), the scale multiplies the learning rate
    exactly as torch's scheduler multiplies a group's ``lr`` (with
    ``lr = 1``, ``min_lr = min_scale``), on top of any schedule. ``min_scale`` and
    ``eps`` are in units of the scale, not of the learning rate: a torch recipe's
    ``min_lr`` and ``eps`` at learning rate ``lr`` are ``min_lr / lr`` and ``eps / lr`` here. Unlike
    ``optax.contrib.reduce_on_plateau``, which reads the metric as an extra
    argument of every ``update`` and averages it over ``accumulation_size``
    calls, the metric here arrives only when the loop has one (an evaluation),
    the scale is read without a metric, and counting is torch's
    (``cooldown``, ``eps``, ``min_scale`` as ``min_lr``).

    Args:
      factor: the scale's multiplier on a plateau, in (0, 1).
      patience: observations without improvement tolerated before a reduction.
      threshold: the least change that counts as an improvement (>= 0; < 1 when rel).
      cooldown: observations to wait after a reduction before counting again.
      min_scale: the scale's floor, in [0, 1].
      mode: ``"min"`` (a loss) or ``"max"`` (an accuracy).
      threshold_mode: ``"rel"`` or ``"abs"``.
      eps: a reduction smaller than this is skipped (torch's ``eps``).
    """
    validation.check_positive("factor", factor)
    if not factor < 1:
        raise ValueError(f"factor must be < 1, got {factor}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if threshold_mode not in THRESHOLD_MODES:
        raise ValueError(f"threshold_mode must be one of {THRESHOLD_MODES}, got {threshold_mode!r}")
    validation.check_non_negative("threshold", threshold)
    if threshold_mode == "rel" and not threshold < 1:
        raise ValueError(f"threshold must be < 1 with threshold_mode='rel', got {threshold}")
    validation.check_in_range("min_scale", min_scale, 0.0, 1.0)
    validation.check_non_negative("eps", eps)
    rule = PlateauRule(
        factor=float(factor),
        patience=_check_int("patience", patience),
        threshold=float(threshold),
        threshold_mode=threshold_mode,
        cooldown=_check_int("cooldown", cooldown),
        min_scale=float(min_scale),
        mode=mode,
        eps=float(eps),
    )

    def init_fn(params):
        del params
        worst = math.inf if mode == "min" else -math.inf
        # float32 would lose improvements of a large metric smaller than 2^-24 of it.
        dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
        return PlateauState(
            scale=jnp.ones([], dtype),
            best=jnp.asarray(worst, dtype),
            bad_evals=base.init_count(),
            cooldown_left=base.init_count(),
            observations=base.init_count(),
            rule=rule,
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        out = jax.tree.map(lambda u: u * state.scale.astype(u.dtype), updates)
        return out, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _improves(rule: PlateauRule, value: jax.Array, best: jax.Array) -> jax.Array:
    if rule.mode == "min":
        bar = best * (1 - rule.threshold) if rule.threshold_mode == "rel" else best - rule.threshold
        return value < bar
    bar = best * (1 + rule.threshold) if rule.threshold_mode == "rel" else best + rule.threshold
    return value > bar


def _observe_one(state: PlateauState, metric: jax.Array) -> PlateauState:
    rule = state.rule
    value = jnp.asarray(metric, state.best.dtype)
    improved = _improves(rule, value, state.best)
    best = jnp.where(improved, value, state.best)
    bad = jnp.where(improved, 0, state.bad_evals + 1)
    in_cooldown = state.cooldown_left > 0
    cooldown_left = jnp.where(in_cooldown, state.cooldown_left - 1, state.cooldown_left)
    bad = jnp.where(in_cooldown, 0, bad)
    reduce = bad > rule.patience
    lowered = jnp.maximum(state.scale * rule.factor, rule.min_scale)
    scale = jnp.where(reduce & (state.scale - lowered > rule.eps), lowered, state.scale)
    return PlateauState(
        scale=scale.astype(state.scale.dtype),
        best=best.astype(state.best.dtype),
        bad_evals=jnp.where(reduce, 0, bad).astype(state.bad_evals.dtype),
        cooldown_left=jnp.where(reduce, rule.cooldown, cooldown_left).astype(
            state.cooldown_left.dtype
        ),
        observations=base.increment_count(state.observations),
        rule=rule,
    )


def _is_plateau(node: Any) -> bool:
    return isinstance(node, PlateauState)


def observe_plateau(opt_state: Any, metric: float | jax.Array) -> Any:
    """``opt_state`` with every :func:`reduce_on_plateau` state updated by one observation.

    Pure and jit-able (``jax.jit(observe_plateau)``); ``metric`` is a scalar,
    e.g. the evaluation loss. Raises ValueError if the state has no
    :class:`PlateauState`.
    """
    if not base.find_states(opt_state, PlateauState):
        raise ValueError("the optimizer state holds no PlateauState (no reduce_on_plateau)")
    return jax.tree.map(
        lambda node: _observe_one(node, metric) if _is_plateau(node) else node,
        opt_state,
        is_leaf=_is_plateau,
    )


def plateau_scale(opt_state: Any) -> jax.Array:
    """The current scale of the first :class:`PlateauState` in ``opt_state`` (a scalar)."""
    found = base.find_states(opt_state, PlateauState)
    if not found:
        raise ValueError("the optimizer state holds no PlateauState (no reduce_on_plateau)")
    return found[0].scale
