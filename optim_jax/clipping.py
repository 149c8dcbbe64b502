"""Gradient clipping: by global norm, by value, and unit-wise adaptive clipping (AGC).

Every transformation here records the global L2 norm of the gradients it
received, *before* clipping, in a :class:`ClipState`, so a training loop can
log it without computing it a second time::

    tx = optax.chain(clip_by_global_norm(1.0), optim_jax.adamw(3e-4))
    updates, opt_state = tx.update(grads, opt_state, params)
    metrics["grad_norm"] = pre_clip_global_norm(opt_state)

The norm is taken in float32 or wider (:func:`optim_jax.base.global_norm`), also
for bfloat16 gradients, and stored as a float32 scalar. Non-finite gradients stay
non-finite after clipping (``inf * 0`` is NaN), so a
:func:`optim_jax.wrappers.skip_not_finite` placed around the chain still sees them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim_jax import base, flat, validation

# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing.
TORCH_NORM_EPS = 1e-6
# Floor on the gradient's unit norm in AGC (NFNets reference implementation).
AGC_GRAD_NORM_FLOOR = 1e-6


class ClipState(NamedTuple):
    """State of every clipping transformation: the incoming gradients' global norm.

    ``pre_clip_norm`` is the L2 norm over all leaves of the gradients the last
    ``update`` received, before clipping, as a float32 scalar (0 after ``init``).
    """

    pre_clip_norm: jax.Array


def _init_clip_state(params: base.Params) -> ClipState:
    del params
    return ClipState(pre_clip_norm=jnp.zeros([], jnp.float32))


def _record(updates: base.Updates) -> tuple[jax.Array, ClipState]:
    norm = base.global_norm(updates)
    return norm, ClipState(pre_clip_norm=norm.astype(jnp.float32))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Rescales all gradients together so their global L2 norm is at most about ``max_norm``.

    Exactly the rule of ``torch.nn.utils.clip_grad_norm_(params, max_norm)``:

    .. math::
        n = \\lVert g \\rVert_2 \\text{ (all leaves together)}, \\qquad
        c = \\min\\left(1, \\frac{\\text{max\\_norm}}{n + 10^{-6}}\\right), \\qquad
        g \\leftarrow c\\, g

    The gradients are always multiplied by ``c`` (by exactly 1 below the
    threshold, which changes nothing). Because of the ``1e-6`` a clipped
    gradient's norm is ``max_norm * n / (n + 1e-6)``, a hair under ``max_norm``.

    ``optax.clip_by_global_norm`` differs: it has no ``1e-6`` and computes
    ``where(n < max_norm, g, g * max_norm / n)``; the two agree to about
    ``1e-6 / n`` relative (see OPTIMIZER_FACTS: worth ~1e-7 on typical norms).

    The norm and the scaling run in float32 or wider; updates come back in
    each gradient's dtype. The pre-clip norm ``n`` is kept in :class:`ClipState`.

    Args:
      max_norm: the threshold, > 0.
    """
    validation.check_positive("max_norm", max_norm)

    def update_fn(updates, state, params=None):
        del state, params
        norm, new_state = _record(updates)
        coef = jnp.minimum(max_norm / (norm + TORCH_NORM_EPS), 1.0)
        updates = jax.tree.map(
            lambda g: (g.astype(base.compute_dtype(g.dtype)) * coef).astype(g.dtype), updates
        )
        return updates, new_state

    return optax.GradientTransformation(_init_clip_state, update_fn)


def clip_by_value(max_delta: float) -> optax.GradientTransformation:
    """Clamps every gradient coordinate to ``[-max_delta, max_delta]``.

    The rule of ``torch.nn.utils.clip_grad_value_(params, max_delta)`` and of
    ``optax.clip(max_delta)``: ``g <- clip(g, -max_delta, max_delta)``,
    elementwise, in the gradient's dtype (NaN stays NaN). The global norm of the
    gradients before clamping is kept in :class:`ClipState`.

    Args:
      max_delta: the bound, > 0.
    """
    validation.check_positive("max_delta", max_delta)

    def update_fn(updates, state, params=None):
        del state, params
        base.refuse_complex(updates, "clip_by_value")  # a complex number has no order
        _, new_state = _record(updates)
        updates = jax.tree.map(lambda g: jnp.clip(g, -max_delta, max_delta), updates)
        return updates, new_state

    return optax.GradientTransformation(_init_clip_state, update_fn)


def unit_norms(x: jax.Array) -> jax.Array:
    """The L2 norm of every output unit of ``x``, shaped to broadcast against ``x``.

    A unit is one index of the LAST axis: the norm reduces over all other axes
    (JAX/Flax layouts put the output features last: ``(in, out)`` dense kernels,
    ``HWIO`` convolution kernels). Scalars and vectors (``ndim <= 1``, e.g.
    biases and norm scales) are one unit. Computed in float32 or wider.
    """
    x = x.astype(base.compute_dtype(x.dtype))
    axes = None if x.ndim <= 1 else tuple(range(x.ndim - 1))
    return jnp.sqrt(jnp.sum(base.squared_magnitude(x), axis=axes, keepdims=True))


def adaptive_grad_clip(clipping: float, eps: float = 1e-3) -> optax.GradientTransformation:
    """Unit-wise adaptive gradient clipping, AGC (Brock et al. 2021, NFNets).

    For each unit ``i`` of each leaf (see :func:`unit_norms`), with ``W`` the
    parameter and ``G`` its gradient:

    .. math::
        m_i = \\lambda \\max(\\lVert W_i \\rVert, \\epsilon), \\qquad
        G_i \\leftarrow G_i \\cdot \\min\\left(1,
            \\frac{m_i}{\\max(\\lVert G_i \\rVert, 10^{-6})}\\right)

    with ``lambda = clipping``. This equals the reference's
    ``where(||G_i|| < m_i, G_i, G_i * m_i / max(||G_i||, 1e-6))``. The paper
    uses ``eps = 1e-3`` and ``clipping`` between 0.01 and 0.16 depending on the
    batch size, and does not clip the final linear layer.

    Axis convention: the unit is the last axis, the output dimension of JAX
    kernels. PyTorch stores weights output-first (``(out, in)`` linear,
    ``OIHW`` conv), so timm's ``adaptive_clip_grad`` reduces over every axis but
    the FIRST; the two agree once the kernel is transposed to the other layout.
    The rule is the same for every rank, so an attention projection kernel
    ``(embed, heads, head_dim)`` is clipped per ``head_dim`` index.

    Differences from ``optax.adaptive_grad_clip`` (0.2.8) and the official
    NFNets JAX code, which pick axes by rank: for a rank-3 tensor they reduce
    over axis 0 only (a "multi-head linear": one unit per ``(head, dim)``
    pair), where this function reduces over axes 0 and 1; Optax also squeezes
    size-1 axes first (so a ``(1, n)`` kernel becomes one unit) and rejects
    rank > 5. Ranks 0-2, 4 and 5 without size-1 axes give the same numbers.

    Needs ``params`` in ``update``. The global norm of the incoming gradients is
    kept in :class:`ClipState`.

    Args:
      clipping: ``lambda``, the largest allowed ratio of gradient to weight norm, > 0.
      eps: the floor on a unit's weight norm (so zero-initialised units can move), >= 0.
    """
    validation.check_positive("clipping", clipping)
    validation.check_non_negative("eps", eps)

    def one(g, p):
        g32 = g.astype(base.compute_dtype(g.dtype))
        max_norm = clipping * jnp.maximum(unit_norms(p), eps)
        grad_norm = jnp.maximum(unit_norms(g32), AGC_GRAD_NORM_FLOOR)
        factor = jnp.minimum(1.0, max_norm / grad_norm)
        return (g32 * factor).astype(g.dtype)

    def update_fn(updates, state, params=None):
        del state
        if params is None:
            raise ValueError("adaptive_grad_clip needs `params` in update(); pass them.")
        flat.refuse_flat(params, "adaptive_grad_clip", "it clips each unit of each tensor")
        _, new_state = _record(updates)
        return jax.tree.map(one, updates, params), new_state

    return optax.GradientTransformation(_init_clip_state, update_fn)


def pre_clip_global_norm(opt_state: Any) -> jax.Array:
    """The pre-clip global gradient norm recorded by a clipping transformation in ``opt_state``.

    Searches the whole state (chains, ``optax.masked``, ``inject_hyperparams``
    and this library's wrappers keep inner states as pytree children) for a
    :class:`ClipState`. If there are several, returns the FIRST in pytree order,
    which for a chain is the clipping transformation that comes first. Works
    inside and outside ``jit`` (no host transfer).

    What the number means depends on where the clipping sits: inside
    ``optax.masked`` it is the norm of the masked-in leaves only; inside
    :func:`optim_jax.wrappers.accumulate_gradients` it is the norm of the
    averaged gradient of the last applied step (unchanged on the micro-steps in
    between); inside :func:`optim_jax.wrappers.skip_not_finite` it keeps the
    value of the last finite step when a step is skipped.

    Raises:
      ValueError: if ``opt_state`` holds no :class:`ClipState`.
    """
    found = base.find_states(opt_state, ClipState)
    if not found:
        raise ValueError("the optimizer state holds no ClipState (no clipping transformation)")
    return found[0].pre_clip_norm
