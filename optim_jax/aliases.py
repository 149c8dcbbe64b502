"""Optimizers as chains of the building blocks in :mod:`optim_jax.transforms`.

Every alias ends with ``scale_by_learning_rate``, so ``optax.apply_updates(params,
updates)`` performs ``p <- p + u``. Defaults follow the reference named in each
docstring; ``learning_rate`` and, where noted, other hyperparameters accept a
schedule ``count -> value`` evaluated at the number of updates already applied.
"""

from __future__ import annotations

import optax

from optim_jax import base, validation
from optim_jax.transforms.adaptive import scale_by_adagrad, scale_by_adam, scale_by_rmsprop
from optim_jax.transforms.momentum import trace
from optim_jax.transforms.scale import scale_by_learning_rate
from optim_jax.transforms.weight_decay import MaskOrFn, add_decayed_weights


def is_zero(value: base.ScalarOrSchedule) -> bool:
    """True for the number 0; a schedule is never statically zero."""
    return not callable(value) and float(value) == 0.0


def chain_present(*transforms: optax.GradientTransformation | None) -> optax.GradientTransformation:
    """``optax.chain`` of the transforms that are not None."""
    return optax.chain(*(t for t in transforms if t is not None))


def decoupled_weight_decay(
    weight_decay: base.ScalarOrSchedule, mask: MaskOrFn
) -> optax.GradientTransformation | None:
    """``add_decayed_weights`` when ``weight_decay`` can be non-zero, else None."""
    validation.check_non_negative("weight_decay", weight_decay)
    return None if is_zero(weight_decay) else add_decayed_weights(weight_decay, mask)


def sgd(
    learning_rate: base.ScalarOrSchedule,
    momentum: base.ScalarOrSchedule = 0.0,
    nesterov: bool = False,
    weight_decay: base.ScalarOrSchedule = 0.0,
) -> optax.GradientTransformation:
    """Stochastic gradient descent with torch.optim.SGD semantics (dampening 0).

    .. math::
        g_t \\leftarrow g_t + \\lambda p_{t-1}, \\quad
        b_t = \\mu b_{t-1} + g_t, \\quad
        p_t = p_{t-1} - \\eta_t\\,(g_t + \\mu b_t \\text{ if Nesterov else } b_t)

    Weight decay is L2 (added to the gradient before the momentum buffer), as
    in torch. The same numbers as ``optax.chain(optax.add_decayed_weights(wd),
    optax.sgd(lr, momentum, nesterov))``.
    """
    validation.check_beta("momentum", momentum)
    if nesterov and is_zero(momentum):
        raise ValueError("nesterov=True needs momentum > 0 (as in torch.optim.SGD)")
    return chain_present(
        decoupled_weight_decay(weight_decay, None),
        None if is_zero(momentum) else trace(momentum, nesterov),
        scale_by_learning_rate(learning_rate),
    )


def adagrad(
    learning_rate: base.ScalarOrSchedule,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
) -> optax.GradientTransformation:
    """Adagrad with torch.optim.Adagrad's defaults (``lr_decay=0``, ``weight_decay=0``).

    ``p <- p - lr * g / (sqrt(s) + eps)`` with ``s`` the running sum of ``g**2``
    started at ``initial_accumulator_value``. Optax's ``adagrad`` differs:
    ``initial_accumulator_value=0.1``, ``eps=1e-7`` inside the square root.
    """
    return optax.chain(
        scale_by_adagrad(initial_accumulator_value, eps), scale_by_learning_rate(learning_rate)
    )


def rmsprop(
    learning_rate: base.ScalarOrSchedule,
    decay: base.ScalarOrSchedule = 0.99,
    eps: float = 1e-8,
    momentum: float = 0.0,
    centered: bool = False,
) -> optax.GradientTransformation:
    """RMSprop with torch.optim.RMSprop's defaults and eps placement.

    See :func:`optim_jax.transforms.scale_by_rmsprop` for the rule. Equals
    ``optax.rmsprop(lr, decay=0.99, eps=eps, eps_in_sqrt=False, centered=...,
    momentum=...)``; Optax's own defaults (decay 0.9, eps inside the root) differ.
    """
    return optax.chain(
        scale_by_rmsprop(decay, eps, momentum, centered), scale_by_learning_rate(learning_rate)
    )


def adam(
    learning_rate: base.ScalarOrSchedule,
    b1: base.ScalarOrSchedule = 0.9,
    b2: base.ScalarOrSchedule = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """Adam (Kingma & Ba 2015) with torch.optim.Adam's defaults.

    ``p <- p - lr * m_hat / (sqrt(v_hat) + eps)``; see
    :func:`optim_jax.transforms.scale_by_adam`. Identical to ``optax.adam``.
    """
    return optax.chain(scale_by_adam(b1, b2, eps), scale_by_learning_rate(learning_rate))


def adamw(
    learning_rate: base.ScalarOrSchedule,
    b1: base.ScalarOrSchedule = 0.9,
    b2: base.ScalarOrSchedule = 0.999,
    eps: float = 1e-8,
    weight_decay: base.ScalarOrSchedule = 0.01,
    mask: MaskOrFn = None,
) -> optax.GradientTransformation:
    """AdamW (Loshchilov & Hutter 2019) with torch.optim.AdamW's defaults.

    .. math::
        p_t = p_{t-1} - \\eta_t \\left(\\frac{\\hat m_t}{\\sqrt{\\hat v_t} + \\epsilon}
              + \\lambda p_{t-1}\\right)

    torch writes the same step as ``p *= 1 - lr*wd`` followed by the Adam step.
    The decay is multiplied by the (scheduled) learning rate, as in torch and
    Optax. Optax's ``adamw`` defaults to ``weight_decay=1e-4``; torch and this
    function use ``1e-2``. ``mask`` (a pytree of booleans or a function of the
    params) excludes leaves from the decay; see
    :func:`optim_jax.decay_mask` for the usual choice.
    """
    return chain_present(
        scale_by_adam(b1, b2, eps),
        decoupled_weight_decay(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )
