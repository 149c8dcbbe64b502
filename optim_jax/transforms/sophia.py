"""Sophia (Liu et al. 2023): clipped, diagonally preconditioned momentum.

The Hessian-diagonal estimate comes from outside the optimizer: a training step
computes it (with :func:`optim_jax.hessian.gauss_newton_bartlett_diag` for
Sophia-G or :func:`optim_jax.hessian.hutchinson_diag` for Sophia-H) and passes
it to ``update`` as the keyword ``hessian_diag``. The transformation blends it
into its running average only on refresh steps, every ``update_interval``
updates, so the estimator can be paid for only when
:func:`sophia_hessian_due` says so. A jitted step::

    def train_step(params, opt_state, batch, key):
        grads = jax.grad(loss_fn)(params, batch)
        hessian_diag = jax.lax.cond(
            optim_jax.sophia_hessian_due(opt_state),
            lambda: optim_jax.hessian.gauss_newton_bartlett_diag(
                logits_fn, params, key, batch["inputs"]),
            lambda: optim_jax.hessian.zeros_like_estimate(params),
        )
        updates, opt_state = tx.update(grads, opt_state, params, hessian_diag=hessian_diag)
        return optax.apply_updates(params, updates), opt_state
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim_jax import base, quantization, validation


class SophiaState(NamedTuple):
    count: jax.Array  # updates applied so far (schedules are read at this value)
    steps_to_refresh: jax.Array  # int32; 0 means the next update blends in a new estimate
    mu: base.Updates  # m: EMA of the gradients, one per parameter (signed)
    # h: EMA of the Hessian-diagonal estimates, one per parameter. Signed: a Hutchinson
    # estimate can be negative and h is stored unclamped (only the denominator is floored).
    hessian: base.Updates


def scale_by_sophia(
    b1: base.ScalarOrSchedule = 0.965,
    b2: base.ScalarOrSchedule = 0.99,
    gamma: base.ScalarOrSchedule = 0.04,
    eps: float = 1e-15,
    update_interval: int = 10,
    moment_dtype: quantization.MomentDtype = None,
) -> optax.GradientTransformationExtraArgs:
    """Sophia's clipped direction (Liu et al. 2023, Algorithm 3), without decay or learning rate.

    .. math::
        m_t &= \\beta_1 m_{t-1} + (1-\\beta_1) g_t \\\\
        h_t &= \\beta_2 h_{t-k} + (1-\\beta_2) \\hat h_t \\ \\text{ if } t \\bmod k = 1,
            \\quad h_t = h_{t-1} \\text{ otherwise} \\\\
        u_t &= \\operatorname{clip}\\!\\left(\\frac{m_t}{\\max(\\gamma h_t, \\epsilon)},
            -1, 1\\right)

    ``t`` counts updates from 1 and ``k = update_interval``: the first update and
    every ``k``-th after it are refresh steps, and the refreshed ``h_t`` already
    preconditions that update (the paper's order). ``\\hat h_t`` is the keyword
    argument ``hessian_diag`` of ``update`` (a pytree like the parameters, any
    float dtype). It is read only on refresh steps; on other steps, and when it
    is None, ``h`` is kept. Pass it on every step under ``jit`` (zeros are fine
    off-refresh) or only when :func:`sophia_hessian_due` is true; a refresh step
    given None leaves ``h`` unchanged and the refresh is skipped. Inside
    ``optax.masked`` or ``optax.partition``, pass ``mask_compatible_extra_args=True``
    so that ``hessian_diag`` is masked like the updates. There is no bias
    correction, as in the paper and the official code. Coordinates where
    ``\\gamma h_t \\le \\epsilon`` (``h`` still zero, or a negative Hutchinson
    estimate) take a sign step ``\\pm 1``.

    Defaults: ``b1, b2 = 0.965, 0.99``, ``gamma = 0.04`` (its ``rho``),
    ``eps = 1e-15`` and ``k = 10`` are those of the official SophiaG code
    (github.com/Liuhong99/Sophia, ``SophiaG`` class and ``train_sophiag.py``).
    That code stores ``h`` as an EMA of the squared sampled-label gradient
    ``\\hat g^2`` and divides by ``\\rho \\cdot bs \\cdot h + 10^{-15}``,
    ``bs`` the number of tokens; our Gauss-Newton-Bartlett estimator returns
    ``B \\hat g^2`` (the paper's Algorithm 2), so ``gamma`` here is their
    ``rho``. Their ``eps`` is added instead of taken as a floor, a difference
    of relative size ``eps / (gamma h)``. Their training loop also first
    refreshes ``h`` after update ``k``, so their first ``k`` updates are sign
    steps; ours refresh on update 1.

    ``optax.contrib.sophia`` differs: it runs its own Hutchinson estimator
    inside ``update`` (Sophia-H, needs an ``obj_fn`` keyword), bias-corrects
    ``m``, preconditions each update with the ``h`` from before that update's
    refresh, and defaults to ``gamma = 0.01``, ``eps = 1e-8``, ``wd = 1e-4``.

    Args:
      b1: EMA decay of the gradients, ``[0, 1)``; a number or a schedule.
      b2: EMA decay of the Hessian estimates, ``[0, 1)``, applied once per
        refresh; a number or a schedule (read at the refresh's count).
      gamma: scale of ``h`` in the denominator, ``>= 0`` (paper: ``gamma``;
        official code: ``rho``); a number or a schedule.
      eps: floor of the denominator, ``> 0``.
      update_interval: ``k``, updates between Hessian refreshes, ``>= 1``.
      moment_dtype: how ``m`` and ``h`` are stored: None (the parameter's dtype),
        ``"float32"``, ``"bfloat16"`` or ``"int8"`` (block-wise 8-bit; see
        :mod:`optim_jax.quantization`). Both use the signed code book: ``h`` is
        not clamped at zero, and a Hutchinson estimate can make it negative.
    """
    validation.check_beta("b1", b1)
    validation.check_beta("b2", b2)
    validation.check_non_negative("gamma", gamma)
    validation.check_positive("eps", eps)
    validation.check_positive_int("update_interval", update_interval, array_ok=True)
    quantization.moment_format(moment_dtype)  # a bad value is an error here, not at init

    def init_fn(params):
        base.refuse_complex(params, "scale_by_sophia")
        return SophiaState(
            count=base.init_count(),
            steps_to_refresh=jnp.zeros([], jnp.int32),
            mu=quantization.tree_init(params, moment_dtype, signed=True),
            hessian=quantization.tree_init(params, moment_dtype, signed=True),
        )

    def update_fn(updates, state, params=None, *, hessian_diag=None, **extra_args):
        del params, extra_args  # other keyword arguments belong to other chain members
        beta1 = base.resolve(b1, state.count)
        beta2 = base.resolve(b2, state.count)
        scale = base.resolve(gamma, state.count)
        refresh = state.steps_to_refresh == 0
        store = quantization.writer(moment_dtype, state.count)

        def one(g, m, h, estimate):
            g32 = g.astype(base.compute_dtype(g.dtype))
            new_m = beta1 * quantization.read(m, g32.dtype) + (1 - beta1) * g32
            new_h = quantization.read(h, g32.dtype)
            if estimate is not None:
                blended = beta2 * new_h + (1 - beta2) * estimate.astype(g32.dtype)
                new_h = jnp.where(refresh, blended, new_h)
            direction = jnp.clip(new_m / jnp.maximum(scale * new_h, eps), -1.0, 1.0)
            if estimate is None:
                stored_h = h  # never changes: not even re-encoded
            else:
                # Off refresh steps the stored h is kept as it is rather than written back:
                # re-encoding a decoded int8 block is not always exact (the signed code book
                # has +1 but not -1, so a block whose largest value is negative would shrink
                # on every step between refreshes).
                stored_h = jax.tree.map(
                    lambda new, old: jnp.where(refresh, new, old), store(new_h, h), h
                )
            return direction.astype(g.dtype), store(new_m, m), stored_h

        if hessian_diag is None:
            hessian_diag = jax.tree.map(lambda _: None, updates)
        out, new_mu, new_h = base.tree_map_multi(
            one, 3, updates, state.mu, state.hessian, hessian_diag
        )
        steps_to_refresh = jnp.where(refresh, update_interval - 1, state.steps_to_refresh - 1)
        new_state = SophiaState(
            count=base.increment_count(state.count),
            steps_to_refresh=steps_to_refresh.astype(jnp.int32),
            mu=new_mu,
            hessian=new_h,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sophia_hessian_due(opt_state: Any) -> jax.Array:
    """True when the next ``update`` of a Sophia optimizer will blend in a new Hessian estimate.

    A scalar boolean array, usable under ``jit`` as the predicate of
    ``jax.lax.cond(due, estimate, zeros)``, so the estimator runs only on
    refresh steps. Finds every :class:`SophiaState` in ``opt_state`` (through
    chains, masks and wrappers) and is true when any of them is due; raises
    ValueError when there is none.
    """
    states = base.find_states(opt_state, SophiaState)
    if not states:
        raise ValueError("sophia_hessian_due: no SophiaState in the optimizer state")
    due = states[0].steps_to_refresh == 0
    for state in states[1:]:
        due = due | (state.steps_to_refresh == 0)
    return due
