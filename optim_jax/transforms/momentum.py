"""Heavy-ball and Nesterov momentum with torch.optim.SGD semantics."""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax

from optim_jax import base, quantization, validation


class TraceState(NamedTuple):
    count: jax.Array
    momentum: base.Updates  # the buffer ``b``, one per parameter (see moment_dtype)


def trace(
    decay: base.ScalarOrSchedule,
    nesterov: bool = False,
    moment_dtype: quantization.MomentDtype = None,
) -> optax.GradientTransformation:
    """Momentum buffer, dampening 0 (torch.optim.SGD).

    .. math::
        b_t = \\mu b_{t-1} + g_t, \\qquad
        u_t = g_t + \\mu b_t \\text{ (Nesterov) or } b_t

    with ``b_0 = 0``, so the first step gives ``b_1 = g_1`` exactly as torch's
    buffer initialisation does.
    ``moment_dtype``: how the buffer is stored: None (the parameter's dtype),
    ``"float32"``, ``"bfloat16"`` or ``"int8"`` (block-wise 8-bit; see
    :mod:`optim_jax.quantization`).
    """
    validation.check_beta("momentum", decay)

    def init_fn(params):
        momentum = quantization.tree_init(params, moment_dtype, signed=True)
        return TraceState(count=base.init_count(), momentum=momentum)

    def update_fn(updates, state, params=None):
        del params
        mu = base.resolve(decay, state.count)
        store = quantization.writer(moment_dtype, state.count)

        def one(g, b):
            g32 = g.astype(base.compute_dtype(g.dtype))
            new_b = mu * quantization.read(b, g32.dtype) + g32
            out = g32 + mu * new_b if nesterov else new_b
            return out.astype(g.dtype), store(new_b, b)

        out, new_momentum = base.tree_map_multi(one, 2, updates, state.momentum)
        return out, TraceState(count=base.increment_count(state.count), momentum=new_momentum)

    return optax.GradientTransformation(init_fn, update_fn)
