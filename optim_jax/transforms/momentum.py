"""Heavy-ball and Nesterov momentum with torch.optim.SGD semantics."""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from optim_jax import base, validation


class TraceState(NamedTuple):
    count: jax.Array
    momentum: base.Updates  # the buffer ``b``, one per parameter, in the parameter's dtype


def trace(decay: base.ScalarOrSchedule, nesterov: bool = False) -> optax.GradientTransformation:
    """Momentum buffer, dampening 0 (torch.optim.SGD).

    .. math::
        b_t = \\mu b_{t-1} + g_t, \\qquad
        u_t = g_t + \\mu b_t \\text{ (Nesterov) or } b_t

    with ``b_0 = 0``, so the first step gives ``b_1 = g_1`` exactly as torch's
    buffer initialisation does.
    """
    validation.check_beta("momentum", decay)

    def init_fn(params):
        return TraceState(count=base.init_count(), momentum=base.tree_zeros_like(params))

    def update_fn(updates, state, params=None):
        del params
        mu = base.resolve(decay, state.count)

        def one(g, b):
            g32 = g.astype(base.compute_dtype(g.dtype))
            new_b = mu * b.astype(g32.dtype) + g32
            out = g32 + mu * new_b if nesterov else new_b
            return out.astype(g.dtype), new_b.astype(b.dtype)

        out, new_momentum = base.tree_map_multi(one, 2, updates, state.momentum)
        return out, TraceState(count=base.increment_count(state.count), momentum=new_momentum)

    return optax.GradientTransformation(init_fn, update_fn)
