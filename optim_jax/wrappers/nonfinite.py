"""Skipping optimizer steps whose gradients contain NaN or Inf."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim_jax import base
from optim_jax.wrappers.accumulation import match_dtypes


class SkipNotFiniteState(NamedTuple):
    """State of :func:`skip_not_finite`.

    Attributes:
      inner_state: the wrapped transformation's state, untouched by skipped steps.
      notfinite_count: int32, consecutive skipped steps (0 after a finite step).
      total_skipped: int32, skipped steps since ``init`` (saturates at the int32 max).
      last_step_finite: bool scalar, whether the last gradients were all finite
        (True after ``init``).
    """

    inner_state: Any
    notfinite_count: jax.Array
    total_skipped: jax.Array
    last_step_finite: jax.Array


def skip_not_finite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Runs ``inner`` only on steps whose gradients are all finite; counts the others.

    If any entry of any gradient leaf is NaN or +-Inf, the step is skipped: the
    updates are zeros (so ``optax.apply_updates`` leaves the parameters bitwise
    unchanged), ``inner``'s state is returned as it was (bitwise), and the
    counters ``notfinite_count`` (consecutive) and ``total_skipped`` go up. A
    finite step runs ``inner`` exactly as without the wrapper and resets
    ``notfinite_count``. The choice runs in ``lax.cond`` on device: a skipped
    step does not compute the inner update and nothing is synchronised with the
    host. Only the incoming gradients are checked, not what ``inner`` computes.

    There is deliberately NO limit after which a non-finite step is applied
    anyway (``optax.apply_if_finite(inner, max_consecutive_errors)`` applies the
    update once the limit is passed, writing NaN into the parameters and the
    optimizer state). Here every non-finite step is skipped; the training loop
    reads ``notfinite_count`` (see :func:`nonfinite_skip_counts`) and decides
    when to stop, lower a loss scale, or roll back to a checkpoint.

    With gradient accumulation, two orders make sense:

    * ``skip_not_finite(accumulate_gradients(opt, k))`` drops a bad
      micro-gradient on its own: it is not added to the sum and the micro-step
      counter does not advance, so each optimizer step still averages ``k``
      finite micro-gradients (one more micro-batch is consumed). Recommended
      when occasional bad micro-batches are expected.
    * ``accumulate_gradients(skip_not_finite(opt), k)`` lets the NaN into the
      sum and skips the whole optimizer step at the ``k``-th micro-step (the sum
      is then cleared), like torch's ``GradScaler`` with accumulation; the
      counters count optimizer steps.

    Args:
      inner: the transformation (usually a whole optimizer) to protect.
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return SkipNotFiniteState(
            inner_state=inner.init(params),
            notfinite_count=base.init_count(),
            total_skipped=base.init_count(),
            last_step_finite=jnp.ones([], jnp.bool_),
        )

    def update_fn(updates, state, params=None, **extra_args):
        finite = base.all_finite(updates)

        def step(inner_state):
            out, new_inner = inner.update(updates, inner_state, params, **extra_args)
            return base.tree_cast_like(out, updates), match_dtypes(new_inner, inner_state)

        def skip(inner_state):
            return base.tree_zeros_like(updates), inner_state

        out, inner_state = jax.lax.cond(finite, step, skip, state.inner_state)
        new_state = SkipNotFiniteState(
            inner_state=inner_state,
            notfinite_count=jnp.where(finite, 0, base.increment_count(state.notfinite_count)),
            total_skipped=jnp.where(
                finite, state.total_skipped, base.increment_count(state.total_skipped)
            ),
            last_step_finite=finite,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def nonfinite_skip_counts(opt_state: Any) -> tuple[jax.Array, jax.Array]:
    """``(consecutive, total)`` skipped steps from the first :class:`SkipNotFiniteState`.

    Both are int32 scalar arrays; works under ``jit``. A loop can stop when
    ``consecutive`` exceeds its patience.

    Raises:
      ValueError: if ``opt_state`` holds no :class:`SkipNotFiniteState`.
    """
    found = base.find_states(opt_state, SkipNotFiniteState)
    if not found:
        raise ValueError("the optimizer state holds no SkipNotFiniteState (no skip_not_finite)")
    return found[0].notfinite_count, found[0].total_skipped
