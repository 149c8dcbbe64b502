"""Per-coordinate adaptive scaling: Adagrad, RMSprop and Adam, with torch.optim semantics.

Each transformation returns the *direction* of the update; the learning rate
and its sign are applied by :func:`optim_jax.transforms.scale_by_learning_rate`
at the end of the chain (see :mod:`optim_jax.aliases`). The arithmetic runs in
float32 or wider; the state keeps each parameter's dtype.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim_jax import base, quantization, validation


class AdagradState(NamedTuple):
    sum_of_squares: base.Updates


def scale_by_adagrad(
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    moment_dtype: quantization.MomentDtype = None,
) -> optax.GradientTransformation:
    """Adagrad (Duchi et al. 2011) as torch.optim.Adagrad computes it.

    .. math::
        s_t = s_{t-1} + g_t^2, \\qquad u_t = g_t / (\\sqrt{s_t} + \\epsilon)

    with ``s_0 = initial_accumulator_value``. Optax's ``scale_by_rss`` differs:
    it puts ``eps`` inside the square root and starts the sum at 0.1.
    ``moment_dtype``: how the sums are stored: None (the parameter's dtype),
    ``"float32"``, ``"bfloat16"`` or ``"int8"`` (block-wise 8-bit; see
    :mod:`optim_jax.quantization`).
    """
    validation.check_non_negative("initial_accumulator_value", initial_accumulator_value)
    validation.check_non_negative("eps", eps)

    quantization.moment_format(moment_dtype)

    def init_fn(params):
        base.refuse_complex(params, "scale_by_adagrad")
        quantization.check_layout(params, moment_dtype)

        def one(p):
            start = base.full_like_param(p, initial_accumulator_value, base.compute_dtype(p.dtype))
            return quantization.write(start, quantization.init(p, moment_dtype, signed=False))

        return AdagradState(jax.tree.map(one, params))

    def update_fn(updates, state, params=None):
        del params
        # No count in this state: the values alone seed the rounding bits. A sum that meets
        # the same increment at the same value draws alike again (as rounding to nearest
        # always would); with gradients that vary, every step draws afresh.
        store = quantization.writer(moment_dtype, None)

        def one(g, s):
            g32 = g.astype(base.compute_dtype(g.dtype))
            new_s = quantization.read(s, g32.dtype) + g32 * g32
            direction = g32 / (jnp.sqrt(new_s) + eps)
            return direction.astype(g.dtype), store(new_s, s)

        out, new_sum = base.tree_map_multi(one, 2, updates, state.sum_of_squares)
        return out, AdagradState(new_sum)

    return optax.GradientTransformation(init_fn, update_fn)


class RmspropState(NamedTuple):
    count: jax.Array
    square_avg: base.Updates
    grad_avg: base.Updates | None  # only with centered=True
    momentum: base.Updates | None  # only with momentum > 0


def scale_by_rmsprop(
    decay: base.ScalarOrSchedule = 0.99,
    eps: float = 1e-8,
    momentum: float = 0.0,
    centered: bool = False,
    moment_dtype: quantization.MomentDtype = None,
) -> optax.GradientTransformation:
    """RMSprop (Hinton 2012) as torch.optim.RMSprop computes it.

    .. math::
        v_t &= \\alpha v_{t-1} + (1-\\alpha) g_t^2 \\\\
        \\bar g_t &= \\alpha \\bar g_{t-1} + (1-\\alpha) g_t \\quad\\text{(centered only)} \\\\
        d_t &= \\sqrt{v_t - \\bar g_t^2} + \\epsilon \\text{ (centered), }
            \\sqrt{v_t} + \\epsilon \\text{ (plain)} \\\\
        b_t &= \\mu b_{t-1} + g_t / d_t, \\qquad u_t = b_t \\text{ (or } g_t/d_t
            \\text{ when } \\mu = 0)

    ``eps`` is added outside the square root as in torch; Optax's default puts
    it inside (``eps_in_sqrt=True``) and uses ``decay=0.9``.
    ``moment_dtype``: how the averages and the momentum buffer are stored: None (the
    parameter's dtype), ``"float32"``, ``"bfloat16"`` or ``"int8"`` (block-wise 8-bit; see
    :mod:`optim_jax.quantization`).
    """
    validation.check_beta("decay", decay)
    validation.check_non_negative("eps", eps)
    validation.check_beta("momentum", momentum)
    use_momentum = not base.is_zero(momentum)

    def init_fn(params):
        base.refuse_complex(params, "scale_by_rmsprop")

        def zeros(signed: bool):
            return quantization.tree_init(params, moment_dtype, signed=signed)

        return RmspropState(
            count=base.init_count(),
            square_avg=zeros(signed=False),
            grad_avg=zeros(signed=True) if centered else None,
            momentum=zeros(signed=True) if use_momentum else None,
        )

    def update_fn(updates, state, params=None):
        del params
        alpha = base.resolve(decay, state.count)
        store = quantization.writer(moment_dtype, state.count)

        def one(g, v, gbar, b):
            g32 = g.astype(base.compute_dtype(g.dtype))
            new_v = alpha * quantization.read(v, g32.dtype) + (1 - alpha) * g32 * g32
            if centered:
                new_gbar = alpha * quantization.read(gbar, g32.dtype) + (1 - alpha) * g32
                # v >= gbar^2 in exact arithmetic; rounding (and low-precision state) can
                # make the difference slightly negative, where torch would give NaN.
                denom = jnp.sqrt(jnp.maximum(new_v - new_gbar * new_gbar, 0.0)) + eps
                new_gbar = store(new_gbar, gbar)
            else:
                new_gbar = None
                denom = jnp.sqrt(new_v) + eps
            direction = g32 / denom
            if use_momentum:
                direction = momentum * quantization.read(b, g32.dtype) + direction
                new_b = store(direction, b)
            else:
                new_b = None
            return direction.astype(g.dtype), store(new_v, v), new_gbar, new_b

        none_tree = jax.tree.map(lambda _: None, updates)
        grad_avg = state.grad_avg if centered else none_tree
        buffers = state.momentum if use_momentum else none_tree
        out, new_v, new_gbar, new_b = base.tree_map_multi(
            one, 4, updates, state.square_avg, grad_avg, buffers
        )
        new_state = RmspropState(
            count=base.increment_count(state.count),
            square_avg=new_v,
            grad_avg=new_gbar if centered else None,
            momentum=new_b if use_momentum else None,
        )
        return out, new_state

    return optax.GradientTransformation(init_fn, update_fn)


class AdamState(NamedTuple):
    count: jax.Array
    mu: base.Updates  # first moment m, one per parameter
    nu: base.Updates  # second moment v, one per parameter


class AmsgradState(NamedTuple):
    """Adam's state with AMSGrad. A class of its own, so that Adam's state (and the
    checkpoints holding it) keep their structure."""

    count: jax.Array
    mu: base.Updates
    nu: base.Updates
    nu_max: base.Updates  # the largest v so far, one per parameter


def adam_scalars(
    b1: base.ScalarOrSchedule, b2: base.ScalarOrSchedule, count: jax.Array
) -> tuple[Any, Any, jax.Array, jax.Array]:
    """``(beta1, beta2, 1 / (1 - beta1^t), 1 / (1 - beta2^t))`` for the update after ``count``.

    Betas given as schedules are evaluated at ``count`` (``t - 1``) and the bias
    correction uses the current value, as Optax's ``inject_hyperparams`` does. The
    reciprocals are taken once: multiplying every element by them is the form XLA would
    pick for some trees and not others (dividing by a scalar shared by many leaves stays
    a division), so stating it keeps results independent of how the leaves are laid out.
    """
    beta1 = base.resolve(b1, count)
    beta2 = base.resolve(b2, count)
    t = base.increment_count(count)
    return beta1, beta2, 1 / base.bias_correction(beta1, t), 1 / base.bias_correction(beta2, t)


def adam_direction(
    m: jax.Array, v: jax.Array, inverse_correction1: Any, inverse_correction2: Any, eps: Any
) -> jax.Array:
    """Adam's step direction from the new moments, ``m_hat / (sqrt(v_hat) + eps)``."""
    return (m * inverse_correction1) / (jnp.sqrt(v * inverse_correction2) + eps)


def scale_by_adam(
    b1: base.ScalarOrSchedule = 0.9,
    b2: base.ScalarOrSchedule = 0.999,
    eps: float = 1e-8,
    moment_dtype: quantization.MomentDtype = None,
    amsgrad: bool = False,
) -> optax.GradientTransformation:
    """Adam's direction (Kingma & Ba 2015) with torch.optim.Adam's eps placement.

    .. math::
        m_t &= \\beta_1 m_{t-1} + (1-\\beta_1) g_t, \\qquad
        v_t = \\beta_2 v_{t-1} + (1-\\beta_2) g_t^2 \\\\
        u_t &= \\frac{m_t / (1-\\beta_1^t)}{\\sqrt{v_t / (1-\\beta_2^t)} + \\epsilon}

    ``t`` counts from 1. Identical to ``optax.scale_by_adam(eps_root=0)``.
    Betas given as schedules are evaluated at ``t - 1`` and the bias
    correction uses the current value, as Optax's ``inject_hyperparams`` does.
    ``moment_dtype``: how the moments are stored: None (the parameter's dtype),
    ``"float32"``, ``"bfloat16"`` or ``"int8"`` (block-wise 8-bit; see
    :mod:`optim_jax.quantization`).

    ``amsgrad`` (Reddi et al. 2018, in torch.optim.Adam's form): ``v_t`` in the
    denominator is replaced by ``max(v_1, ..., v_t)`` (kept in the state as
    ``nu_max`` of an :class:`AmsgradState`), bias-corrected with the current
    ``1 - beta_2^t`` as torch does. The paper keeps no bias correction; Optax's
    ``scale_by_amsgrad`` takes the maximum of the corrected ``v_hat``, which no
    setting of torch reproduces.
    """
    validation.check_beta("b1", b1)
    validation.check_beta("b2", b2)
    validation.check_non_negative("eps", eps)

    def init_fn(params):
        base.refuse_complex(params, "scale_by_adam")
        moments = (
            quantization.tree_init(params, moment_dtype, signed=True),
            quantization.tree_init(params, moment_dtype, signed=False),
        )
        if amsgrad:
            nu_max = quantization.tree_init(params, moment_dtype, signed=False)
            return AmsgradState(base.init_count(), *moments, nu_max)
        return AdamState(base.init_count(), *moments)

    def update_fn(updates, state, params=None):
        del params
        beta1, beta2, inverse_correction1, inverse_correction2 = adam_scalars(b1, b2, state.count)
        store = quantization.writer(moment_dtype, state.count)

        def one(g, m, v, v_max):
            g32 = g.astype(base.compute_dtype(g.dtype))
            new_m = beta1 * quantization.read(m, g32.dtype) + (1 - beta1) * g32
            new_v = beta2 * quantization.read(v, g32.dtype) + (1 - beta2) * g32 * g32
            denominator_v, new_v_max = new_v, None
            if v_max is not None:
                denominator_v = jnp.maximum(quantization.read(v_max, g32.dtype), new_v)
                new_v_max = store(denominator_v, v_max)
            direction = adam_direction(
                new_m, denominator_v, inverse_correction1, inverse_correction2, eps
            )
            return direction.astype(g.dtype), store(new_m, m), store(new_v, v), new_v_max

        maxima = state.nu_max if amsgrad else jax.tree.map(lambda _: None, updates)
        out, new_mu, new_nu, new_max = base.tree_map_multi(
            one, 4, updates, state.mu, state.nu, maxima
        )
        count = base.increment_count(state.count)
        if amsgrad:
            return out, AmsgradState(count, new_mu, new_nu, new_max)
        return out, AdamState(count, new_mu, new_nu)

    return optax.GradientTransformation(init_fn, update_fn)
