"""Scaling by a (scheduled) learning rate: the last link of every optimizer chain."""

from __future__ import annotations

import jax
import optax

from optim_jax import base, validation


def scale_by_learning_rate(
    learning_rate: base.ScalarOrSchedule, *, flip_sign: bool = True
) -> optax.GradientTransformation:
    """``u <- -lr_t * u`` (or ``+lr_t * u`` with ``flip_sign=False``).

    ``lr_t`` is ``learning_rate(t)`` for a schedule, where ``t`` counts the
    updates already applied (0 on the first update), the convention of
    :mod:`optim_jax.schedules`.
    """
    validation.check_non_negative("learning_rate", learning_rate)
    sign = -1.0 if flip_sign else 1.0

    def init_fn(params):
        del params
        return base.CountState(count=base.init_count())

    def update_fn(updates, state, params=None):
        del params
        lr = sign * base.resolve(learning_rate, state.count)
        updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)
        return updates, base.CountState(count=base.increment_count(state.count))

    return optax.GradientTransformation(init_fn, update_fn)
