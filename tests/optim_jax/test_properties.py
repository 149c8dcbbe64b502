"""Hypothesis properties of the optimizers on random pytrees and hyperparameters (issue 4).

What this file proves, for random nested dict/list pytrees of 1..4 float32 leaves
(shapes from a small fixed set that includes scalars, shape-(1,) leaves and
matrices, so Adafactor's factored path runs) and random hyperparameters:

1. Finite in, finite out: every optimizer alias and clipping transformation,
   given finite params and finite gradients (all-zero gradients, zero params,
   magnitudes from 1e-30 to 1e6 mixed inside one leaf), returns finite updates
   and finite state for a few steps. Excluded, because the math itself leaves
   the finite range: eps = 0 (0 / 0 on zero gradients), Adafactor's eps1 = 0
   (likewise), and Adafactor's HF weight decay together with parameter scaling,
   ``p -= lambda * rho * RMS(p) * p``, which is quadratic in ``p`` and diverges
   for ``lambda * rho * RMS(p) > 2`` (params of 1e6 overflow in three steps).
2. Scale invariance in the gradient: ``update(c * g) == update(g)`` for
   ``c`` in ``[1e-3, 1e3]``, asserted only where the paper's rule is
   homogeneous of degree 0 in ``g``:

   * adam, adamw: ``m_hat / sqrt(v_hat)``; ``m`` scales by ``c``, ``sqrt(v)``
     by ``c``. AdamW's decay term ``lambda * p`` does not depend on ``g`` at
     all, so the whole AdamW update is invariant with the decay included.
   * rmsprop (plain, centered, with momentum): ``g / sqrt(v)`` and
     ``g / sqrt(v - gbar**2)`` are degree 0; the momentum buffer sums them.
   * adagrad with ``initial_accumulator_value = 0``: ``g / sqrt(sum g**2)``.
     A positive initial value is a fixed offset under the root and breaks it.
   * lamb: the Adam direction plus ``lambda * p`` (invariant), then a trust
     ratio of norms of those invariant quantities.
   * lars with ``weight_decay = 0`` and ``eps = 0`` and non-zero weights:
     ``eta * ||w|| * g / ||g||``. Decay (``beta * ||w||`` beside ``||g||``),
     ``eps`` and the ratio-1 fallback for zero weights all break it.
   * lion: ``sign(b1 * m + (1 - b1) * g)`` with ``m`` linear in ``g``.
   * adafactor, in every mode (relative step, parameter scaling, first
     moment, update clipping, decay): ``g / sqrt(v_hat)`` is degree 0, the
     RMS clipping of a degree-0 quantity is degree 0, and the step size
     ``alpha_t`` depends on ``t`` and the params only.

   Not invariant, so not asserted: sgd (linear in ``g``), sophia (the
   curvature ``h`` comes from ``hessian_diag``, not from ``g``), adagrad with
   a positive initial accumulator, lars with decay or ``eps``, and the clipping
   transformations (scale-dependent by design). The ``eps`` terms break the
   invariance by a relative ``eps / (c * sqrt(v))``; the tests choose
   ``eps = 1e-12`` (Adafactor keeps its default ``eps1 = 1e-30`` inside the
   root) and gradients of magnitude 0 or at least 1e-2, which puts that term
   below 1e-5 relative, under the stated tolerance.
3. Lion without weight decay moves every coordinate by exactly ``lr`` (or 0
   where the interpolation is exactly 0), in the direction opposite to the
   sign of a float64 recomputation of the interpolation.
4. ``clip_by_global_norm(max_norm)`` returns a global norm at most
   ``max_norm * (1 + 1e-6)``, rescales all leaves by one common factor, and
   leaves gradients bit-for-bit unchanged when their norm is clearly below
   ``max_norm``.
5. ``accumulate_gradients(inner, N)`` returns exactly zero updates and leaves
   the inner state untouched on calls 1..N-1 of each group, and on call N the
   update of one ``inner`` step on the mean of the group's N gradients, over
   two groups (so the inner state and the params carry over).

Every example runs unjitted (eager): each new optimizer would otherwise be
compiled once per example, which costs far more than the eager steps here.
Hypothesis is derandomized and keeps no example database, so CI is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import optim_jax

# Few distinct shapes keep the eager per-op compilation cache small. Scalars and
# shape (1,) are the easiest leaves to get wrong; (2, 3) and (2, 1, 3) are
# factored by Adafactor (the latter with a size-1 axis).
LEAF_SHAPES: list[tuple[int, ...]] = [(), (1,), (4,), (2, 3), (2, 1, 3)]
N_STEPS = 3

PROPERTY_SETTINGS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------------------
# Strategies: pytree layouts, leaf values, hyperparameters
# --------------------------------------------------------------------------------------

Layout = tuple[Any, list[tuple[int, ...]]]  # (treedef, leaf shapes in tree order)


def nest(draw: st.DrawFn, leaf_ids: list[int], depth: int) -> Any:
    """A dict or list holding the ``leaf_ids`` directly or in sub-containers (depth <= 2)."""
    children: list[Any] = []
    i = 0
    while i < len(leaf_ids):
        size = 1 if depth >= 2 else draw(st.integers(1, len(leaf_ids) - i))
        chunk = leaf_ids[i : i + size]
        i += size
        children.append(chunk[0] if size == 1 else nest(draw, chunk, depth + 1))
    if draw(st.booleans()):
        return {f"k{j}": child for j, child in enumerate(children)}
    return children


@st.composite
def layouts(draw: st.DrawFn) -> Layout:
    n_leaves = draw(st.integers(1, 4))
    shapes = [draw(st.sampled_from(LEAF_SHAPES)) for _ in range(n_leaves)]
    skeleton = nest(draw, list(range(n_leaves)), depth=0)
    return jax.tree.structure(skeleton), shapes


def floats32(lo: float, hi: float) -> st.SearchStrategy[float]:
    # No subnormals: XLA on CPU flushes them to zero, so they would not be the
    # values the optimizer sees.
    # Bounds rounded to float32 first: hypothesis wants them representable.
    return st.floats(f32(lo), f32(hi), width=32, allow_subnormal=False)


def f32(x: float) -> float:
    """``x`` rounded to the nearest float32, as a Python float."""
    return float(np.float32(x))


def signed(magnitudes: st.SearchStrategy[float]) -> st.SearchStrategy[float]:
    return st.tuples(magnitudes, st.booleans()).map(lambda t: -t[0] if t[1] else t[0])


# Only the extremes, so that zero rows sit next to 1e6 rows in one matrix.
EXTREME_VALUES = st.sampled_from([f32(x) for x in (0.0, 1e-30, -1e-30, 1e6, -1e6)])
# Finite values from 0 through 1e-30 to 1e6, mixed within a leaf: extreme ends
# drawn explicitly, plus whole ranges at both scales.
WILD_VALUES = st.one_of(
    EXTREME_VALUES,
    floats32(-1e6, 1e6),
    floats32(-1e-28, 1e-28),
)
# Magnitudes 0 or in [1e-2, 1e2]: far above every eps after scaling by c >= 1e-3.
SCALABLE_GRAD_VALUES = st.one_of(st.just(0.0), signed(floats32(1e-2, 1e2)))
# Non-zero weights (LARS's trust ratio falls back to 1 on a zero-norm leaf).
NONZERO_PARAM_VALUES = signed(floats32(0.1, 10.0))
# Multiples of 1/16 up to 4: float32 sums of up to 4 of them are exact, and a
# non-zero mean is at least 1/64, so means cannot be cancellation residue.
GRID_VALUES = st.integers(-64, 64).map(lambda k: k / 16.0)


def trees(layout: Layout, values: st.SearchStrategy[float]) -> st.SearchStrategy[Any]:
    """Pytrees of float32 jax arrays with ``layout``, elements from ``values``."""
    treedef, shapes = layout
    leaves = [hnp.arrays(np.float32, shape, elements=values) for shape in shapes]
    return st.tuples(*leaves).map(
        lambda arrays: jax.tree.unflatten(treedef, [jnp.asarray(a) for a in arrays])
    )


def wild_trees(layout: Layout) -> st.SearchStrategy[Any]:
    """Finite pytrees, sometimes all zeros."""
    zeros = jax.tree.unflatten(layout[0], [jnp.zeros(s, jnp.float32) for s in layout[1]])
    return st.one_of(st.just(zeros), trees(layout, WILD_VALUES), trees(layout, EXTREME_VALUES))


def log_uniform(lo: float, hi: float) -> st.SearchStrategy[float]:
    return st.floats(math.log10(lo), math.log10(hi)).map(lambda e: 10.0**e)


LR = log_uniform(1e-4, 1.0)
B1 = st.floats(0.0, 0.99)
B2 = st.floats(0.9, 0.9999)
EPS = log_uniform(1e-12, 1e-6)
WEIGHT_DECAY = st.floats(0.0, 0.1)
MOMENTUM = st.floats(0.1, 0.99)

MakeTx = Callable[[st.DrawFn], optax.GradientTransformation]


def draw_adafactor(
    draw: st.DrawFn, *, decay_with_param_scale: bool = True, **fixed: Any
) -> optax.GradientTransformation:
    """Adafactor in any mode; ``fixed`` overrides drawn keyword arguments.

    ``decay_with_param_scale=False`` draws no weight decay when the step size is
    scaled by RMS(p): HF's decay ``p -= lambda * rho * RMS(p) * p`` is then
    quadratic in ``p`` and, for ``lambda * rho * RMS(p) > 2``, legitimately
    diverges (params of 1e6 overflow float32 within three steps).
    """
    relative = draw(st.booleans())
    scale_parameter = draw(st.booleans())
    decays = decay_with_param_scale or not scale_parameter
    kwargs: dict[str, Any] = {
        "learning_rate": None if relative else draw(LR),
        "warmup_init": relative and draw(st.booleans()),
        "scale_parameter": scale_parameter,
        "b1": draw(st.one_of(st.none(), B1)),
        "weight_decay": draw(WEIGHT_DECAY) if decays else 0.0,
        "clip_threshold": draw(st.one_of(st.none(), st.floats(0.5, 2.0))),
        "decay_rate": draw(st.floats(-1.0, -0.5)),
        "min_dim_size_to_factor": draw(st.sampled_from([0, 2, 128])),
        "factored": draw(st.booleans()),
        # eps1 > 0 is required for zero gradients: with eps1 = 0 the second
        # moment of an all-zero coordinate is 0 and 0 / sqrt(0) is NaN (as in HF).
        "eps": (draw(st.sampled_from([1e-30, 1e-20])), draw(st.sampled_from([1e-3, 1e-2]))),
    }
    kwargs.update(fixed)
    return optim_jax.adafactor(**kwargs)


# Every optimizer alias and clipping transformation, each with random hyperparameters.
ALL_TRANSFORMS: dict[str, MakeTx] = {
    "sgd": lambda d: optim_jax.sgd(d(LR), weight_decay=d(WEIGHT_DECAY)),
    "sgd_momentum": lambda d: optim_jax.sgd(d(LR), d(MOMENTUM), weight_decay=d(WEIGHT_DECAY)),
    "sgd_nesterov": lambda d: optim_jax.sgd(
        d(LR), d(MOMENTUM), nesterov=True, weight_decay=d(WEIGHT_DECAY)
    ),
    "adagrad": lambda d: optim_jax.adagrad(d(LR), d(st.floats(0.0, 1.0)), d(EPS)),
    "rmsprop": lambda d: optim_jax.rmsprop(
        d(LR), d(st.floats(0.5, 0.999)), d(EPS), d(st.floats(0.0, 0.99)), d(st.booleans())
    ),
    "adam": lambda d: optim_jax.adam(d(LR), d(B1), d(B2), d(EPS)),
    "adamw": lambda d: optim_jax.adamw(d(LR), d(B1), d(B2), d(EPS), d(WEIGHT_DECAY)),
    "lamb": lambda d: optim_jax.lamb(d(LR), d(B1), d(B2), d(EPS), d(WEIGHT_DECAY)),
    "lars": lambda d: optim_jax.lars(
        d(LR), d(st.floats(0.0, 0.99)), d(WEIGHT_DECAY), d(log_uniform(1e-4, 0.1)), d(EPS)
    ),
    "lion": lambda d: optim_jax.lion(d(LR), d(B1), d(B2), d(WEIGHT_DECAY)),
    "adafactor": lambda d: draw_adafactor(d, decay_with_param_scale=False),
    "sophia": lambda d: optim_jax.sophia(
        d(LR),
        d(B1),
        d(B2),
        d(st.floats(0.0, 0.1)),
        d(log_uniform(1e-15, 1e-8)),
        d(WEIGHT_DECAY),
        d(st.integers(1, 3)),
    ),
    "clip_by_global_norm": lambda d: optim_jax.clip_by_global_norm(d(log_uniform(1e-3, 1e3))),
    "adaptive_grad_clip": lambda d: optim_jax.adaptive_grad_clip(
        d(log_uniform(1e-3, 1.0)), d(st.floats(0.0, 1e-2))
    ),
    "clip_by_value": lambda d: optim_jax.clip_by_value(d(log_uniform(1e-3, 1e3))),
}

TINY_EPS = 1e-12
# The optimizers whose rule is invariant under g -> c * g (see the module docstring).
SCALE_INVARIANT: dict[str, MakeTx] = {
    "adam": lambda d: optim_jax.adam(d(LR), d(B1), d(B2), TINY_EPS),
    "adamw": lambda d: optim_jax.adamw(d(LR), d(B1), d(B2), TINY_EPS, d(WEIGHT_DECAY)),
    "rmsprop": lambda d: optim_jax.rmsprop(
        d(LR), d(st.floats(0.9, 0.999)), TINY_EPS, d(st.floats(0.0, 0.99)), d(st.booleans())
    ),
    "adagrad_zero_init": lambda d: optim_jax.adagrad(d(LR), 0.0, TINY_EPS),
    "lamb": lambda d: optim_jax.lamb(d(LR), d(B1), d(B2), TINY_EPS, d(WEIGHT_DECAY)),
    "lars_no_decay": lambda d: optim_jax.lars(
        d(LR), d(st.floats(0.0, 0.99)), 0.0, d(log_uniform(1e-4, 0.1)), 0.0
    ),
    "lion": lambda d: optim_jax.lion(d(LR), d(B1), d(B2), d(WEIGHT_DECAY)),
    "adafactor": draw_adafactor,
}

# Inner optimizers for the accumulation property: one of each kind of state
# (momentum buffer, Adam moments with a counter, factored statistics, centered
# averages). Lion and LAMB are left out: a sign, or a trust ratio of a
# near-zero leaf, turns a 1-ulp difference between two ways of forming the
# same mean into an O(1) difference, which would test rounding, not the wrapper.
ACCUMULATION_INNER: dict[str, MakeTx] = {
    "sgd_nesterov": lambda d: optim_jax.sgd(d(LR), d(MOMENTUM), nesterov=True),
    "adam": lambda d: optim_jax.adam(d(LR), d(B1), d(B2)),
    "rmsprop_centered": lambda d: optim_jax.rmsprop(d(LR), d(st.floats(0.9, 0.999)), centered=True),
    "adafactor": lambda d: draw_adafactor(d, learning_rate=d(LR), warmup_init=False),
}

# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def assert_all_finite(tree: Any, what: str) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        values = np.asarray(leaf)
        if np.issubdtype(values.dtype, np.floating):
            assert np.all(np.isfinite(values)), f"{what}{jax.tree_util.keystr(path)}: {values}"


def update(tx: optax.GradientTransformation, grads, state, params, **extra):
    """``tx.update``, passing extra keyword arguments only to transformations that take them."""
    if extra:
        return tx.update(grads, state, params, **extra)
    return tx.update(grads, state, params)


def leaves64(tree: Any) -> list[np.ndarray]:
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def norm64(tree: Any) -> float:
    return math.sqrt(sum(float(np.sum(x * x)) for x in leaves64(tree)))


# --------------------------------------------------------------------------------------
# 1. Finite inputs give finite updates and state
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALL_TRANSFORMS))
@given(data=st.data())
@settings(PROPERTY_SETTINGS, max_examples=8)
def test_finite_inputs_give_finite_updates_and_state(name: str, data: st.DataObject) -> None:
    tx = ALL_TRANSFORMS[name](data.draw)
    layout = data.draw(layouts())
    params = data.draw(wild_trees(layout), label="params")
    state = tx.init(params)
    assert_all_finite(state, "initial state")
    for step in range(N_STEPS):
        grads = data.draw(wild_trees(layout), label=f"grads[{step}]")
        extra = {}
        if name == "sophia":
            # Pass an estimate (any sign: Hutchinson's can be negative) every
            # step; Sophia reads it only on refresh steps.
            extra["hessian_diag"] = data.draw(wild_trees(layout), label=f"hessian[{step}]")
        updates, state = update(tx, grads, state, params, **extra)
        assert jax.tree.structure(updates) == jax.tree.structure(grads)
        assert_all_finite(updates, f"updates at step {step}")
        assert_all_finite(state, f"state at step {step}")
        params = optax.apply_updates(params, updates)


# --------------------------------------------------------------------------------------
# 2. Scale invariance of the Adam family
# --------------------------------------------------------------------------------------

# Relative agreement per leaf between updates for c * g and for g. The eps
# terms contribute at most about eps / (c * min|g|) / sqrt(1 - b2) =
# 1e-12 / (1e-3 * 1e-2) / 1e-2 = 1e-5 of the leaf's largest update (for
# Adafactor eps1 / (c * g)**2 <= 1e-30 / 1e-10, nothing). Float32 rounding
# of c * g and of the moments adds a few ulp (1.2e-7 each) per operation,
# amplified at most ~sqrt(steps) by cancellation in the first moment: below 1e-5.
SCALE_RTOL = 1e-4


@pytest.mark.parametrize("name", sorted(SCALE_INVARIANT))
@given(data=st.data(), c=log_uniform(1e-3, 1e3))
@settings(PROPERTY_SETTINGS, max_examples=10)
def test_scaling_gradients_leaves_invariant_updates_unchanged(
    name: str, data: st.DataObject, c: float
) -> None:
    # One transformation, two independent states: optax transformations are pure.
    tx = SCALE_INVARIANT[name](data.draw)
    layout = data.draw(layouts())
    params = data.draw(trees(layout, NONZERO_PARAM_VALUES), label="params")
    state = state_scaled = tx.init(params)
    for step in range(N_STEPS):
        grads = data.draw(trees(layout, SCALABLE_GRAD_VALUES), label=f"grads[{step}]")
        scaled = jax.tree.map(lambda g: g * jnp.float32(c), grads)
        updates, state = tx.update(grads, state, params)
        updates_scaled, state_scaled = tx.update(scaled, state_scaled, params)
        for u, u_c in zip(leaves64(updates), leaves64(updates_scaled), strict=True):
            scale = np.max(np.abs(u), initial=0.0)
            error = np.max(np.abs(u_c - u), initial=0.0)
            assert error <= SCALE_RTOL * scale, (step, c, error, scale, u, u_c)
        # Both runs see the same params, so any difference comes from c alone.
        params = optax.apply_updates(params, updates)


# --------------------------------------------------------------------------------------
# 3. Lion moves every coordinate by exactly the learning rate
# --------------------------------------------------------------------------------------


@given(data=st.data())
@settings(PROPERTY_SETTINGS, max_examples=15)
def test_lion_without_decay_moves_each_coordinate_by_exactly_lr(data: st.DataObject) -> None:
    lr, b1, b2 = data.draw(LR), data.draw(B1), data.draw(B2)
    tx = optim_jax.lion(lr, b1, b2, weight_decay=0.0)
    layout = data.draw(layouts())
    params = data.draw(wild_trees(layout), label="params")
    state = tx.init(params)
    step_size = np.float32(lr)  # the update is float32(-lr) * sign, exactly
    momentum = [np.zeros(shape) for shape in layout[1]]  # float64 replay of m
    for step in range(N_STEPS):
        # Gradients bounded away from 0, so the interpolation is rarely near 0.
        grads = data.draw(trees(layout, signed(floats32(1e-3, 1e3))), label=f"grads[{step}]")
        updates, state = tx.update(grads, state, params)
        for u, g, m in zip(leaves64(updates), leaves64(grads), momentum, strict=True):
            assert np.all((np.abs(u) == step_size) | (u == 0)), (step, u, step_size)
            interpolation = b1 * m + (1 - b1) * g
            # Where the float64 interpolation is clearly away from 0 (more than
            # float32 rounding of its two terms), float32 gets its sign right.
            clear = np.abs(interpolation) > 1e-5 * (np.abs(b1 * m) + np.abs((1 - b1) * g))
            np.testing.assert_array_equal(u[clear], -step_size * np.sign(interpolation[clear]))
        momentum = [b2 * m + (1 - b2) * g for m, g in zip(momentum, leaves64(grads), strict=True)]
        params = optax.apply_updates(params, updates)


# --------------------------------------------------------------------------------------
# 4. Clipping by global norm
# --------------------------------------------------------------------------------------

# Float32 error of the computed norm (a sum of at most 4 * 6 squares, then a
# root: at most 24 ulp / 2, 1.4e-6 relative, in the worst case) is what separates
# "clearly below max_norm" from the band where the rule's own 1e-6 matters.
NORM_SLACK = 2e-6


@given(data=st.data())
@settings(PROPERTY_SETTINGS, max_examples=40)
def test_clip_by_global_norm_bounds_the_norm_and_keeps_small_gradients(
    data: st.DataObject,
) -> None:
    layout = data.draw(layouts())
    grads = data.draw(wild_trees(layout), label="grads")
    norm_in = norm64(grads)
    # Thresholds both independent of the gradients and close to their norm on
    # either side, where the comparison is decided.
    relative = st.floats(0.5, 2.0).map(lambda r: r * norm_in) if norm_in > 0 else st.nothing()
    max_norm = data.draw(st.one_of(log_uniform(1e-3, 1e3), relative), label="max_norm")
    tx = optim_jax.clip_by_global_norm(max_norm)
    clipped, state = tx.update(grads, tx.init(grads))
    # Squares below float32's smallest normal (elements under ~1e-19) vanish, up
    # to 24 of them: an absolute error of at most sqrt(24 * 1.2e-38) < 1e-18.
    recorded = float(optim_jax.pre_clip_global_norm(state))
    assert math.isclose(recorded, norm_in, rel_tol=NORM_SLACK, abs_tol=1e-18), (recorded, norm_in)
    norm_out = norm64(clipped)
    # The brief's bound; the rule itself gives max_norm * n / (n + 1e-6) in exact
    # arithmetic, and float32 rounding of the norm (above) stays under 1e-6.
    assert norm_out <= max_norm * (1 + 1e-6), (norm_out, max_norm, norm_in)
    g_in, g_out = leaves64(grads), leaves64(clipped)
    if norm_in * (1 + NORM_SLACK) + 1e-6 < max_norm:
        # The factor is then exactly 1: not a single bit changes.
        for a, b in zip(g_in, g_out, strict=True):
            np.testing.assert_array_equal(b, a)
    elif norm_in < max_norm:
        # Within 1e-6 (+ rounding) of the threshold torch's 1e-6 may still scale,
        # by a factor max_norm / (n + 1e-6) no further than 1e-6 / max_norm from 1.
        for a, b in zip(g_in, g_out, strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-6 / max_norm + 4 * NORM_SLACK, atol=0)
    # One common factor for every leaf: compare out/in where both are normal floats.
    g_in_flat, g_out_flat = (
        np.concatenate([x.ravel() for x in g_in]),
        np.concatenate([x.ravel() for x in g_out]),
    )
    normal = (np.abs(g_in_flat) > 1e-30) & (np.abs(g_out_flat) > 1e-30)
    if np.any(normal):
        ratios = g_out_flat[normal] / g_in_flat[normal]
        # Each output is one float32 product of the input and the factor: 1 ulp apart.
        np.testing.assert_allclose(ratios, ratios[0], rtol=2.5e-7)


# --------------------------------------------------------------------------------------
# 5. Gradient accumulation equals one step on the mean
# --------------------------------------------------------------------------------------

# The wrapper's mean (a float32 running sum divided by N) and the reference mean
# (exact in float64, rounded once) are at most 1 ulp apart, since the grid makes
# the sum exact. The same inner function then runs on both, eagerly here and
# inside lax.cond there: a few ulp of difference, amplified by the inner rule's
# sensitivity, which is O(1) away from zero means (the grid keeps non-zero
# means >= 1/64, far above every eps). 1e-5 of the leaf's largest update is ~100 ulp.
ACCUMULATION_RTOL = 1e-5
N_GROUPS = 2


@pytest.mark.parametrize("name", sorted(ACCUMULATION_INNER))
@given(data=st.data(), every_k=st.integers(1, 4))
@settings(PROPERTY_SETTINGS, max_examples=6)
def test_accumulation_equals_one_inner_step_on_the_mean(
    name: str, data: st.DataObject, every_k: int
) -> None:
    inner = ACCUMULATION_INNER[name](data.draw)
    tx = optim_jax.accumulate_gradients(inner, every_k)
    # Jitted once per example: eagerly, the wrapper's lax.cond would be traced
    # and compiled again on every call.
    tx_update = jax.jit(tx.update)
    layout = data.draw(layouts())
    params = data.draw(trees(layout, GRID_VALUES), label="params")
    state = tx.init(params)
    inner_state = inner.init(params)
    for group in range(N_GROUPS):
        micro_grads = [
            data.draw(trees(layout, GRID_VALUES), label=f"grads[{group}][{j}]")
            for j in range(every_k)
        ]
        for j, grads in enumerate(micro_grads[:-1]):
            held_inner = state.inner_state
            updates, state = tx_update(grads, state, params)
            for u in leaves64(updates):
                np.testing.assert_array_equal(u, np.zeros_like(u))
            assert not bool(optim_jax.accumulation_step_applied(state))
            assert int(state.micro_step) == j + 1
            jax.tree.map(np.testing.assert_array_equal, state.inner_state, held_inner)
        updates, state = tx_update(micro_grads[-1], state, params)
        assert bool(optim_jax.accumulation_step_applied(state))
        assert int(state.micro_step) == 0
        for s in leaves64(state.grad_sum):
            np.testing.assert_array_equal(s, np.zeros_like(s))

        summed = [sum(parts) for parts in zip(*map(leaves64, micro_grads), strict=True)]
        mean = jax.tree.unflatten(layout[0], [jnp.float32(s / every_k) for s in summed])
        expected, inner_state = inner.update(mean, inner_state, params)
        for u, e in zip(leaves64(updates), leaves64(expected), strict=True):
            scale = np.max(np.abs(e), initial=0.0)
            np.testing.assert_allclose(u, e, rtol=0, atol=ACCUMULATION_RTOL * scale + 1e-30)
        params = optax.apply_updates(params, updates)
