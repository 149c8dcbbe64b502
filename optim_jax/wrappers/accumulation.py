"""Gradient accumulation: one optimizer step per ``every_k`` micro-batches, on their mean."""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim_jax import base, validation


class AccumulationState(NamedTuple):
    """State of :func:`accumulate_gradients`.

    Attributes:
      micro_step: int32, the number of micro-gradients held in ``grad_sum``
        (0 .. every_k - 1); 0 right after an optimizer step.
      applied: bool scalar, True iff the last ``update`` ran the inner
        transformation (the step that completed a group of ``every_k``).
      grad_sum: the running sum of the micro-gradients, one buffer per
        parameter, shaped and sharded like it, in ``accumulator_dtype``.
      inner_state: the wrapped transformation's state; it changes only on
        applied steps.
    """

    micro_step: jax.Array
    applied: jax.Array
    grad_sum: base.Updates
    inner_state: Any


def match_dtypes(new: Any, old: Any) -> Any:
    """``new`` with every leaf cast to the dtype of the matching leaf of ``old``.

    Keeps both branches of a ``lax.cond`` type-identical when the wrapped
    transformation returns a state whose dtypes drifted from its input (e.g.
    a float32 gradient meeting a bfloat16 moment in a transformation that
    does not cast back).
    """
    return jax.tree.map(lambda n, o: jnp.asarray(n).astype(jnp.result_type(o)), new, old)


def check_every_k(every_k: Any) -> int:
    if isinstance(every_k, numbers.Integral) and not isinstance(every_k, bool):
        every_k = int(every_k)
    validation.check_positive_int("every_k", every_k)
    return every_k


def accumulate_gradients(
    inner: optax.GradientTransformation, every_k: int, accumulator_dtype: Any = None
) -> optax.GradientTransformationExtraArgs:
    """Runs ``inner`` once every ``every_k`` calls, on the mean of the gradients received.

    Micro-step ``j = 1 .. every_k`` of each group:

    .. math::
        S \\leftarrow S + g_j; \\qquad
        j < k: \\; u = 0,\\ \\text{inner state unchanged}; \\qquad
        j = k: \\; (u, s_{\\text{inner}}) = \\text{inner.update}(S / k,
            s_{\\text{inner}}, p),\\ S \\leftarrow 0

    so ``k`` micro-batches of size ``b`` give the step that ``inner`` would take
    on one batch of size ``k * b`` (for a loss that is a mean over the batch).
    The parameters do not move between applied steps, so ``inner`` sees the
    same ``params`` as it would without accumulation, and its counters (and
    schedules) advance once per ``every_k`` calls. This is the usual torch
    pattern ``loss / k; backward()`` k times, then ``optimizer.step();
    zero_grad()``, and what ``optax.MultiSteps(inner, k)`` computes (it keeps a
    running mean instead of a sum; the results agree to rounding). The inner
    update runs inside ``lax.cond``, so micro-steps do not pay for it; no value
    leaves the device.

    Put gradient clipping INSIDE (``accumulate_gradients(chain(clip, opt), k)``)
    to clip the averaged gradient as torch recipes do; outside, it clips every
    micro-gradient. For non-finite gradients see
    :func:`optim_jax.wrappers.skip_not_finite` (which documents both orders).

    Precision: ``grad_sum`` is kept in ``accumulator_dtype``; the default
    ``None`` means float32 or wider (the parameter's dtype promoted to at least
    float32), so bfloat16 parameters get a float32 sum (twice the memory of the
    parameter, for accuracy over many micro-steps). Pass e.g. ``jnp.bfloat16``
    to save memory. The mean is cast to the gradient's dtype before it is given
    to ``inner``, and updates come back in the gradient's dtype.

    :func:`accumulation_step_applied` tells a training loop whether the last
    call produced a real step (e.g. to log only then).

    Args:
      inner: the transformation (usually a whole optimizer) to run on the mean.
      every_k: the number of micro-steps per optimizer step, a positive int.
      accumulator_dtype: dtype of ``grad_sum``; None for float32-or-wider.
    """
    every_k = check_every_k(every_k)
    inner = optax.with_extra_args_support(inner)

    def sum_dtype(p):
        if accumulator_dtype is None:
            return base.compute_dtype(p.dtype)
        return jnp.dtype(accumulator_dtype)

    def init_fn(params):
        return AccumulationState(
            micro_step=base.init_count(),
            applied=jnp.zeros([], jnp.bool_),
            grad_sum=jax.tree.map(lambda p: base.zeros_like_param(p, sum_dtype(p)), params),
            inner_state=inner.init(params),
        )

    def update_fn(updates, state, params=None, **extra_args):
        grad_sum = jax.tree.map(lambda g, s: s + g.astype(s.dtype), updates, state.grad_sum)
        micro_step = state.micro_step + 1
        apply = micro_step >= every_k

        def step(grad_sum, inner_state):
            mean = jax.tree.map(lambda s, g: (s / every_k).astype(g.dtype), grad_sum, updates)
            out, new_inner = inner.update(mean, inner_state, params, **extra_args)
            cleared = jax.tree.map(base.zeros_like_param, grad_sum)
            return base.tree_cast_like(out, updates), match_dtypes(new_inner, inner_state), cleared

        def hold(grad_sum, inner_state):
            return base.tree_zeros_like(updates), inner_state, grad_sum

        out, inner_state, grad_sum = jax.lax.cond(apply, step, hold, grad_sum, state.inner_state)
        new_state = AccumulationState(
            micro_step=jnp.where(apply, 0, micro_step).astype(state.micro_step.dtype),
            applied=apply,
            grad_sum=grad_sum,
            inner_state=inner_state,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def accumulation_step_applied(opt_state: Any) -> jax.Array:
    """Whether the last ``update`` of :func:`accumulate_gradients` ran the inner optimizer.

    A bool scalar array (False after ``init``), read from the first
    :class:`AccumulationState` in pytree order; works under ``jit``. Inside
    :func:`optim_jax.wrappers.skip_not_finite`, a skipped call leaves the flag
    as the previous call set it.

    Raises:
      ValueError: if ``opt_state`` holds no :class:`AccumulationState`.
    """
    found = base.find_states(opt_state, AccumulationState)
    if not found:
        raise ValueError("the optimizer state holds no AccumulationState (no accumulate_gradients)")
    return found[0].applied
