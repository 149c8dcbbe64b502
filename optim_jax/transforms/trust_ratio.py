"""Layer-wise trust ratios: the LAMB scaling and LARS's local learning rate.

Both rescale each parameter tensor (each leaf of the pytree) as a whole by a
ratio of norms, so the step taken on a layer is proportional to the size of
the layer's weights. Norms are taken over a whole leaf (on the flat multi-tensor
layout, over each tensor of a group buffer: :func:`optim_jax.flat.map_per_tensor`),
in float32 or wider.
Both transformations need ``params`` in ``update``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optim_jax import base, flat, quantization, validation
from optim_jax.transforms.adaptive import adam_direction, adam_scalars, scale_by_adam
from optim_jax.transforms.weight_decay import MaskOrFn, decayed, optional_weight_decay


def _ratio_or_one(numerator: jax.Array, denominator: jax.Array, ok: jax.Array) -> jax.Array:
    """``numerator / denominator`` where ``ok``, else 1; never divides by zero."""
    return jnp.where(ok, numerator / jnp.where(ok, denominator, 1.0), 1.0)


def _trust_scaled(
    norm: Callable[[jax.Array], jax.Array],
    u: jax.Array,
    p: jax.Array,
    measured: jax.Array,
    trust_coefficient: float,
    eps: float,
) -> jax.Array:
    """``u`` times ``c ||p|| / (||u|| + eps)`` (1 where a norm is 0), ``||u||`` taken of
    ``measured``: ``u`` itself, or the same values computed again for the norm's kernel."""
    u32 = u.astype(base.compute_dtype(u.dtype))
    p_norm = norm(p.astype(u32.dtype))
    u_norm = norm(measured.astype(u32.dtype))
    ratio = _ratio_or_one(trust_coefficient * p_norm, u_norm + eps, (p_norm > 0) & (u_norm > 0))
    return (ratio * u32).astype(u.dtype)


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
        base.refuse_complex(params, "scale_by_trust_ratio")
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        _need_params("scale_by_trust_ratio", params)

        def one(norm, u, p):
            return _trust_scaled(norm, u, p, u, trust_coefficient, eps)

        return flat.map_per_tensor(one, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_lamb(
    b1: base.ScalarOrSchedule = 0.9,
    b2: base.ScalarOrSchedule = 0.999,
    eps: float = 1e-6,
    weight_decay: base.ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    moment_dtype: quantization.MomentDtype = None,
) -> optax.GradientTransformation:
    """LAMB's step before the learning rate: Adam's direction plus decoupled weight decay,
    ``u = m_hat / (sqrt(v_hat) + eps) + wd * p``, scaled per tensor by ``||p|| / ||u||``.

    The numbers and the state of ``optax.chain(optax.chain(scale_by_adam(b1, b2, eps,
    moment_dtype), add_decayed_weights(weight_decay, mask)), scale_by_trust_ratio())``
    (no decay when ``weight_decay`` is 0), which is what runs on GPU and TPU and for
    leaves whose moments are stored rounded (bfloat16, int8).

    On CPU every other leaf's (or flat group's) ``||u||`` is taken from ``u`` computed a
    second time, from the new moments and ``p`` passed through an optimisation barrier
    and the scalars (bias corrections, eps, weight decay) as vectors along the last axis.
    XLA:CPU computes ``u`` (a division and a square root) once for its two readers, the
    norm and the parameter update, so from the chain alone it writes ``u`` to a fresh
    buffer and reads it back; and it gives a whole-array sum to a library kernel that
    computes elementwise inputs inline but not a broadcast scalar (each becomes an array
    of the tensor's size). With its own ``u`` the norm reads ``p`` and the new moments:
    56 bytes per parameter a step instead of 60 per leaf, 59 instead of 63 on the flat
    layout, and no temporary (``benchmarks/optimizers.py``: 0.58 -> 0.36 of Optax's
    step time at 64M parameters, 2026-12-07).
    """
    decay = optional_weight_decay(weight_decay, mask)
    direction = base.chain_present(scale_by_adam(b1, b2, eps, moment_dtype), decay)
    trust = scale_by_trust_ratio()

    def init_fn(params):
        base.refuse_complex(params, "scale_by_lamb")
        return direction.init(params), trust.init(params)

    def update_fn(updates, state, params=None):
        _need_params("scale_by_lamb", params)
        direction_state, trust_state = state
        u, new_direction_state = direction.update(updates, direction_state, params)
        new_state = (new_direction_state, trust_state)
        if not flat.is_flat(u) and any(
            flat.is_flat(x) for x in jax.tree.leaves(u, is_leaf=flat.is_flat)
        ):  # flat groups beside per-leaf arrays: the chain's form
            return trust.update(u, trust_state, params)[0], new_state
        count = direction_state[0].count
        _, _, inverse_correction1, inverse_correction2 = adam_scalars(b1, b2, count)
        wd = 0.0 if decay is None else base.resolve(weight_decay, count)
        scalars = (inverse_correction1, inverse_correction2, eps, wd)

        def measured(u, m, v, p, chosen):
            """``u`` computed again from the stored new moments, for the norm's kernel alone;
            ``u`` itself where the moments are stored rounded (the update read them unrounded)."""
            if u.ndim == 0 or not (
                isinstance(m, jax.Array) and m.dtype == base.compute_dtype(u.dtype)
            ):
                return u
            m, v, p, c1, c2, e, w = jax.lax.optimization_barrier(
                (m, v, p, *(jnp.full(u.shape[-1:], x, m.dtype) for x in scalars))
            )
            return decayed(adam_direction(m, v, c1, c2, e).astype(u.dtype), p, w, chosen)

        if flat.is_flat(u):
            chosen = _decayed_groups(decay is not None, mask, u.layout)

            def again(u, mu, nu, params):
                buffers = [x.buffers for x in (u, mu, nu, params)]
                return flat.FlatParams(
                    {name: measured(*(b[name] for b in buffers), chosen[name]) for name in chosen},
                    u.layout,
                )

        else:
            chosen = _decayed_leaves(decay is not None, mask, params)

            def again(u, mu, nu, params):
                return jax.tree.map(measured, u, mu, nu, params, chosen)

        def on_cpu(u, mu, nu, params):
            def scaled(norm, u, p, measured_u):
                return _trust_scaled(norm, u, p, measured_u, 1.0, 0.0)

            return flat.map_per_tensor(scaled, u, params, again(u, mu, nu, params))

        def elsewhere(u, mu, nu, params):
            del mu, nu
            return trust.update(u, trust_state, params)[0]

        adam_state = new_direction_state[0]
        # One switch for the whole tree (as in Lion): one per leaf lengthens the trace.
        out = jax.lax.platform_dependent(
            u, adam_state.mu, adam_state.nu, params, cpu=on_cpu, default=elsewhere
        )
        return out, new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _decayed_groups(decays: bool, mask: MaskOrFn, layout: flat.FlatLayout) -> dict[str, Any]:
    """Per group buffer of the flat layout: whether the decay applies (as ``tensor_mask``)."""
    if not decays or mask is None:
        return {group.name: decays for group in layout.groups}
    return flat.tensor_mask(mask, layout)


def _decayed_leaves(decays: bool, mask: MaskOrFn, params: base.Params) -> Any:
    """Per parameter leaf: whether the decay applies (a Python bool, or an array mask)."""
    if not decays or mask is None:
        return jax.tree.map(lambda _: decays, params)
    mask_tree = mask(params) if callable(mask) else mask
    chosen = jax.tree.broadcast(mask_tree, params)
    return jax.tree.map(lambda c: bool(c) if isinstance(c, bool | np.bool_) else c, chosen)


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
        base.refuse_complex(params, "scale_by_lars")
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
