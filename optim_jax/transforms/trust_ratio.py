"""Layer-wise trust ratios: the LAMB scaling and LARS's local learning rate.

Both rescale each parameter tensor (each leaf of the pytree) as a whole by a
ratio of norms, so the step taken on a layer is proportional to the size of
the layer's weights. Norms are taken over a whole leaf (on the flat multi-tensor
layout, over each tensor of a group buffer: :func:`optim_jax.flat.map_per_tensor`),
in float32 or wider.
Both transformations need ``params`` in ``update``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optim_jax import base, flat, validation
from optim_jax.transforms.weight_decay import MaskOrFn


def _ratio_or_one(numerator: jax.Array, denominator: jax.Array, ok: jax.Array) -> jax.Array:
    """``numerator / denominator`` where ``ok``, else 1; never divides by zero."""
    return jnp.where(ok, numerator / jnp.where(ok, denominator, 1.0), 1.0)


def _need_params(name: str, params: Any) -> None:
    if params is None:
        raise ValueError(f"{name} needs `params` in update(); pass them.")


def scale_by_trust_ratio(
    trust_coefficient: float = 1.0, eps: float = 0.0
) -> optax.GradientTransformation:
    """LAMB's layer-wise trust ratio (You et al. 2020, Algorithm 2).

    For every parameter tensor ``p`` with incoming update ``u``:

    .. math::
        u \\leftarrow \\rho\\,u, \\qquad
        \\rho = \\begin{cases}
            \\dfrac{c\\,\\lVert p \\rVert}{\\lVert u \\rVert + \\epsilon}
                & \\lVert p \\rVert > 0 \\text{ and } \\lVert u \\rVert > 0 \\\\
            1 & \\text{otherwise}
        \\end{cases}

    with ``c = trust_coefficient``. In LAMB ``u = r + wd * p`` is the Adam
    direction plus decoupled weight decay and ``c = 1, eps = 0``; the paper's
    scaling function ``phi`` is the identity, as in every public implementation.
    A tensor whose weights or update are all zero (a freshly zero-initialised
    bias, say) keeps ratio 1. The same rule as ``optax.scale_by_trust_ratio``
    with ``min_norm=0`` and the NVIDIA apex FusedLAMB kernel.

    Args:
      trust_coefficient: the multiplier ``c`` (> 0).
      eps: added to ``||u||`` in the denominator (>= 0).
    """
    validation.check_positive("trust_coefficient", trust_coefficient)
    validation.check_non_negative("eps", eps)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        _need_params("scale_by_trust_ratio", params)

        def one(norm, u, p):
            u32 = u.astype(base.compute_dtype(u.dtype))
            p_norm = norm(p.astype(u32.dtype))
            u_norm = norm(u32)
            ratio = _ratio_or_one(
                trust_coefficient * p_norm, u_norm + eps, (p_norm > 0) & (u_norm > 0)
            )
            return (ratio * u32).astype(u.dtype)

        return flat.map_per_tensor(one, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_lars(
    trust_coefficient: float = 0.001,
    weight_decay: base.ScalarOrSchedule = 0.0,
    eps: float = 0.0,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    """LARS's local learning rate times the L2-regularised gradient (You, Gitman & Ginsburg 2017).

    For every parameter tensor ``w`` with gradient ``g`` (Algorithm 1 of the paper):

    .. math::
        \\lambda = \\begin{cases}
            \\dfrac{\\eta\\,\\lVert w \\rVert}
                   {\\lVert g \\rVert + \\beta \\lVert w \\rVert + \\epsilon}
                & \\lVert w \\rVert > 0 \\text{ and } \\lVert g \\rVert > 0 \\\\
            1 & \\text{otherwise}
        \\end{cases}, \\qquad
        u = \\lambda\\,(g + \\beta w)

    with ``eta = trust_coefficient`` and ``beta = weight_decay``. The weight
    decay lives inside this transformation because the denominator needs
    ``||g||`` and ``beta * ||w||`` separately. The fallback to 1 on zero norms
    and the ``eps`` follow timm's LARS; the paper has neither.

    Optax and SimCLR's TF LARS differ: their denominator is
    ``||g + beta * w|| + eps``, the norm of the decayed gradient, rather than
    the paper's ``||g|| + beta * ||w||`` (the two agree when ``beta = 0``; by
    the triangle inequality Optax's ratio is never smaller).

    Args:
      trust_coefficient: the paper's trust coefficient ``eta`` (> 0).
      weight_decay: ``beta`` (>= 0), a number or a schedule of the update count.
      eps: added to the denominator (>= 0).
      mask: a pytree of booleans like the parameters (or a function of them);
        leaves marked False pass their gradient through untouched: no decay
        and no local learning rate, the usual treatment of biases and
        normalisation parameters. ``None`` adapts every leaf.
    """
    validation.check_positive("trust_coefficient", trust_coefficient)
    validation.check_non_negative("weight_decay", weight_decay)
    validation.check_non_negative("eps", eps)

    def init_fn(params):
        del params
        return base.CountState(count=base.init_count())

    def update_fn(updates, state, params=None):
        _need_params("scale_by_lars", params)
        wd = base.resolve(weight_decay, state.count)

        def one(norm, g, w):
            g32 = g.astype(base.compute_dtype(g.dtype))
            w32 = w.astype(g32.dtype)
            w_norm = norm(w32)
            g_norm = norm(g32)
            local_lr = _ratio_or_one(
                trust_coefficient * w_norm,
                g_norm + wd * w_norm + eps,
                (w_norm > 0) & (g_norm > 0),
            )
            return (local_lr * (g32 + wd * w32)).astype(g.dtype)

        updates = flat.map_per_tensor(one, updates, params)
        return updates, base.CountState(count=base.increment_count(state.count))

    transform = optax.GradientTransformation(init_fn, update_fn)
    if mask is None:
        return transform
    return flat.masked(transform, mask)
