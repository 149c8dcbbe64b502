"""Weight decay as a transformation: ``u <- u + wd * p``.

Placed before the adaptive scaling it is L2 regularisation (torch ``SGD``,
``Adam(weight_decay=...)``); placed after it and before the learning rate it is
decoupled decay (Loshchilov & Hutter 2019, torch ``AdamW``): the chain then
applies ``p <- p - lr * (adaptive_update + wd * p)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from optim_jax import base, flat, validation

MaskOrFn = Any | Callable[[base.Params], Any] | None


def add_decayed_weights(
    weight_decay: base.ScalarOrSchedule = 0.0, mask: MaskOrFn = None
) -> optax.GradientTransformation:
    """``u <- u + wd_t * p`` for the parameters where ``mask`` is True.

    Args:
      weight_decay: the coefficient ``wd``, a number or a schedule of the update count.
      mask: a pytree of booleans with the structure of the parameters, or a
        function ``params -> such a pytree``; leaves marked False are not
        decayed. ``None`` decays every leaf.
    """
    validation.check_non_negative("weight_decay", weight_decay)

    def init_fn(params):
        del params
        return base.CountState(count=base.init_count())

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("add_decayed_weights needs `params` in update(); pass them.")
        wd = base.resolve(weight_decay, state.count)
        updates = jax.tree.map(
            lambda u, p: (u + wd * p.astype(base.compute_dtype(u.dtype))).astype(u.dtype),
            updates,
            params,
        )
        return updates, base.CountState(count=base.increment_count(state.count))

    transform = optax.GradientTransformation(init_fn, update_fn)
    if mask is None:
        return transform
    return flat.masked(transform, mask)
