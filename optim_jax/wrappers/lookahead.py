"""Lookahead: slow weights that pull back towards the fast weights every k steps."""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim_jax import base, validation


class LookaheadState(NamedTuple):
    """State of :func:`lookahead`.

    Attributes:
      count: int32, base steps taken so far; a synchronisation follows every
        ``sync_period``-th.
      slow: the slow weights ``phi``, one buffer per parameter, shaped,
        sharded and typed like it (``optax.tree_map_params`` maps over it as
        over the parameters).
      inner_state: the base optimizer's state (kept across synchronisations,
        as in the paper's experiments and ``optax.lookahead``).
    """

    count: jax.Array
    slow: base.Params
    inner_state: Any


def lookahead(
    inner: optax.GradientTransformation, sync_period: int = 5, alpha: float = 0.5
) -> optax.GradientTransformationExtraArgs:
    """Lookahead (Zhang et al. 2019, "Lookahead Optimizer: k steps forward, 1 step back").

    The parameters handed to ``update`` are the fast weights ``theta``; the
    state keeps the slow weights ``phi`` (initialised to the parameters). Each
    call takes one step of ``inner``; after every ``k``-th (Algorithm 1):

    .. math::
        \\theta \\leftarrow \\theta + \\text{inner.update}(g, s, \\theta); \\qquad
        \\text{every } k\\text{-th step:}\\;
        \\phi \\leftarrow \\phi + \\alpha (\\theta - \\phi), \\quad \\theta \\leftarrow \\phi

    The returned update moves the parameters to the new fast weights: the
    inner update on ordinary steps, ``phi_new - theta_old`` on synchronising
    steps (so ``optax.apply_updates`` lands on ``phi_new`` up to one rounding
    of the subtraction and re-addition). It therefore drops into a plain optax
    loop with nothing else to carry. ``optax.lookahead`` instead needs the
    loop to hold ``optax.LookaheadParams(fast, slow)`` as its parameters (and
    to evaluate ``.slow`` or ``.fast`` by hand); here the slow weights live in
    the optimizer state, so checkpointing, sharding and evaluation see one
    parameter tree. Between synchronisations the parameters are the fast
    weights; right after one they equal the slow weights (evaluate then for the
    paper's numbers).

    Defaults ``k = 5, alpha = 0.5``: a setting the paper uses throughout its
    experiments (it reports robustness to both). Memory: one extra parameter-sized buffer. The inner
    state is not reset at synchronisation (the paper's default, "maintain").

    Args:
      inner: the base ("fast") optimizer.
      sync_period: ``k``, base steps per synchronisation, a positive int.
      alpha: the slow weights' step size, in (0, 1]; 1 makes lookahead a no-op.
    """
    if isinstance(sync_period, numbers.Integral) and not isinstance(sync_period, bool):
        sync_period = int(sync_period)
    validation.check_positive_int("sync_period", sync_period)
    validation.check_positive("alpha", alpha)
    validation.check_in_range("alpha", alpha, 0.0, 1.0)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        # An explicit copy: the slow weights must never share a buffer with the parameters
        # (outside jit they would be the same array), since a train step donates both.
        slow = jax.tree.map(lambda p: jnp.array(p, copy=True), params)
        return LookaheadState(count=base.init_count(), slow=slow, inner_state=inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("lookahead: update needs params (the fast weights)")
        inner_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        count = base.increment_count(state.count)
        sync = count % sync_period == 0

        def one(u, p, s):
            wide = base.compute_dtype(p.dtype)
            fast = p.astype(wide) + u.astype(wide)
            new_slow = s.astype(wide) + alpha * (fast - s.astype(wide))
            out = jnp.where(sync, new_slow - p.astype(wide), u.astype(wide))
            return out.astype(u.dtype), jnp.where(sync, new_slow.astype(s.dtype), s)

        out, slow = base.tree_map_multi(one, 2, inner_updates, params, state.slow)
        return out, LookaheadState(count=count, slow=slow, inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
