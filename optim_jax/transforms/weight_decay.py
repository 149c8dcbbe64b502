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
import jax.numpy as jnp
import optax

from optim_jax import base, flat, validation

MaskOrFn = Any | Callable[[base.Params], Any] | None


def decayed(u: base.Array, p: base.Array, wd: Any, chosen: Any = True) -> base.Array:
    """``u + wd * p`` where ``chosen``: True, False (``u`` itself) or a boolean array
    broadcasting against ``u``."""
    if chosen is False:
        return u
    term = wd * p.astype(base.compute_dtype(u.dtype))
    if chosen is not True:
        term = jnp.where(chosen, term, -0.0)  # x + (-0.0) is x, bit for bit, for every x
    return (u + term).astype(u.dtype)


def add_decayed_weights(
    weight_decay: base.ScalarOrSchedule = 0.0, mask: MaskOrFn = None
) -> optax.GradientTransformation:
    """``u <- u + wd_t * p`` for the parameters where ``mask`` is True.

    Args:
      weight_decay: the coefficient ``wd``, a number or a schedule of the update count.
      mask: a pytree of booleans with the structure of the parameters, or a
        function ``params -> such a pytree``; leaves marked False are not
        decayed. ``None`` decays every leaf. The state is ``optax.MaskedState``
        then, on per-leaf parameters and on :class:`optim_jax.FlatParams` alike.
    """
    validation.check_non_negative("weight_decay", weight_decay)

    def init_fn(params):
        del params
        return base.CountState(count=base.init_count())

    def update_fn(updates, state, params=None):
        _need_params(params)
        wd = base.resolve(weight_decay, state.count)
        updates = jax.tree.map(lambda u, p: decayed(u, p, wd), updates, params)
        return updates, base.CountState(count=base.increment_count(state.count))

    transform = optax.GradientTransformation(init_fn, update_fn)
    if mask is None:
        return transform
    per_tensor = flat.masked(transform, mask)

    def masked_update_fn(updates, state, params=None, **extra):
        if not flat.is_flat(updates):
            return per_tensor.update(updates, state, params, **extra)
        # flat.masked would pick where(mask, u + wd p, u) per element; choosing the decay term
        # instead reads u once. XLA:CPU does not fuse an expensive producer (Adam's direction)
        # into a kernel that reads it twice, so the first form writes the direction out and
        # reads it back: 8 more bytes per parameter. Masked-out values are u + (-0.0) = u.
        _need_params(params)
        count = state.inner_state.count
        wd = base.resolve(weight_decay, count)
        chosen = flat.tensor_mask(mask, updates.layout)
        buffers = {
            name: decayed(u, params.buffers[name], wd, chosen[name])
            for name, u in updates.buffers.items()
        }
        new_state = base.CountState(count=base.increment_count(count))
        return flat.FlatParams(buffers, updates.layout), optax.MaskedState(inner_state=new_state)

    return optax.GradientTransformationExtraArgs(per_tensor.init, masked_update_fn)


def optional_weight_decay(
    weight_decay: base.ScalarOrSchedule, mask: MaskOrFn
) -> optax.GradientTransformation | None:
    """``add_decayed_weights`` when ``weight_decay`` can be non-zero, else None (for
    ``base.chain_present``). Placed before the scaling it is L2, coupled to the gradient
    (torch's SGD, Adam, RMSprop, Adagrad); after it, decoupled (AdamW)."""
    validation.check_non_negative("weight_decay", weight_decay)
    return None if base.is_zero(weight_decay) else add_decayed_weights(weight_decay, mask)


def _need_params(params: Any) -> None:
    if params is None:
        raise ValueError("add_decayed_weights needs `params` in update(); pass them.")
