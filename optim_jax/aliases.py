"""Optimizers as chains of the building blocks in :mod:`optim_jax.transforms`.

Every alias ends with ``scale_by_learning_rate`` (``lars`` follows it with its
momentum trace, to keep the learning rate inside the buffer), so
``optax.apply_updates(params, updates)`` performs ``p <- p + u``. Defaults
follow the reference named in each docstring; ``learning_rate`` and, where
noted, other hyperparameters accept a schedule ``count -> value`` evaluated at
the number of updates already applied.
"""

from __future__ import annotations

import optax

from optim_jax import base, quantization, validation
from optim_jax.transforms.adafactor import scale_by_adafactor
from optim_jax.transforms.adaptive import scale_by_adagrad, scale_by_adam, scale_by_rmsprop
from optim_jax.transforms.lion import scale_by_lion
from optim_jax.transforms.momentum import trace
from optim_jax.transforms.scale import scale_by_learning_rate
from optim_jax.transforms.sophia import scale_by_sophia
from optim_jax.transforms.trust_ratio import scale_by_lamb, scale_by_lars
from optim_jax.transforms.weight_decay import MaskOrFn, optional_weight_decay


def sgd(
    learning_rate: base.ScalarOrSchedule,
    momentum: base.ScalarOrSchedule = 0.0,
    nesterov: bool = False,
    weight_decay: base.ScalarOrSchedule = 0.0,
    moment_dtype: quantization.MomentDtype = None,
) -> optax.GradientTransformation:
    """Stochastic gradient descent with torch.optim.SGD semantics (dampening 0).

    .. math::
        g_t \\leftarrow g_t + \\lambda p_{t-1}, \\quad
        b_t = \\mu b_{t-1} + g_t, \\quad
        p_t = p_{t-1} - \\eta_t\\,(g_t + \\mu b_t \\text{ if Nesterov else } b_t)

    Weight decay is L2 (added to the gradient before the momentum buffer), as
    in torch. The same numbers as ``optax.chain(optax.add_decayed_weights(wd),
    optax.sgd(lr, momentum, nesterov))``.

    ``moment_dtype`` stores the optimizer's per-parameter buffers in fewer bytes:
    ``"bfloat16"`` or ``"int8"`` (8-bit block-wise, Dettmers et al. 2022); see
    :mod:`optim_jax.quantization`. None keeps the parameter's dtype.
    """
    validation.check_beta("momentum", momentum)
    if nesterov and base.is_zero(momentum):
        raise ValueError("nesterov=True needs momentum > 0 (as in torch.optim.SGD)")
    return base.chain_present(
        optional_weight_decay(weight_decay, None),
        None if base.is_zero(momentum) else trace(momentum, nesterov, moment_dtype),
        scale_by_learning_rate(learning_rate),
    )


def adagrad(
    learning_rate: base.ScalarOrSchedule,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    weight_decay: base.ScalarOrSchedule = 0.0,
    moment_dtype: quantization.MomentDtype = None,
) -> optax.GradientTransformation:
    """Adagrad with torch.optim.Adagrad's defaults.

    ``p <- p - lr * g / (sqrt(s) + eps)`` with ``s`` the running sum of ``g**2``
    started at ``initial_accumulator_value``; ``weight_decay`` is torch's L2 term,
    ``g <- g + weight_decay * p`` first. torch's ``lr_decay`` is the schedule
    ``lambda t: lr / (1 + t * lr_decay)`` as ``learning_rate``. Optax's ``adagrad``
    differs: ``initial_accumulator_value=0.1``, ``eps=1e-7`` inside the square root.

    ``moment_dtype`` stores the optimizer's per-parameter buffers in fewer bytes:
    ``"bfloat16"`` or ``"int8"`` (8-bit block-wise, Dettmers et al. 2022); see
    :mod:`optim_jax.quantization`. None keeps the parameter's dtype.
    """
    return base.chain_present(
        optional_weight_decay(weight_decay, None),
        scale_by_adagrad(initial_accumulator_value, eps, moment_dtype),
        scale_by_learning_rate(learning_rate),
    )


def rmsprop(
    learning_rate: base.ScalarOrSchedule,
    decay: base.ScalarOrSchedule = 0.99,
    eps: float = 1e-8,
    momentum: float = 0.0,
    centered: bool = False,
    weight_decay: base.ScalarOrSchedule = 0.0,
    moment_dtype: quantization.MomentDtype = None,
) -> optax.GradientTransformation:
    """RMSprop with torch.optim.RMSprop's defaults and eps placement.

    See :func:`optim_jax.transforms.scale_by_rmsprop` for the rule; ``weight_decay``
    is torch's L2 term, ``g <- g + weight_decay * p`` first. Equals
    ``optax.rmsprop(lr, decay=0.99, eps=eps, eps_in_sqrt=False, centered=...,
    momentum=...)``; Optax's own defaults (decay 0.9, eps inside the root) differ.

    ``moment_dtype`` stores the optimizer's per-parameter buffers in fewer bytes:
    ``"bfloat16"`` or ``"int8"`` (8-bit block-wise, Dettmers et al. 2022); see
    :mod:`optim_jax.quantization`. None keeps the parameter's dtype.
    """
    return base.chain_present(
        optional_weight_decay(weight_decay, None),
        scale_by_rmsprop(decay, eps, momentum, centered, moment_dtype),
        scale_by_learning_rate(learning_rate),
    )


def adam(
    learning_rate: base.ScalarOrSchedule,
    b1: base.ScalarOrSchedule = 0.9,
    b2: base.ScalarOrSchedule = 0.999,
    eps: float = 1e-8,
    weight_decay: base.ScalarOrSchedule = 0.0,
    moment_dtype: quantization.MomentDtype = None,
    amsgrad: bool = False,
) -> optax.GradientTransformation:
    """Adam (Kingma & Ba 2015) with torch.optim.Adam's defaults.

    ``p <- p - lr * m_hat / (sqrt(v_hat) + eps)``; see
    :func:`optim_jax.transforms.scale_by_adam`. Identical to ``optax.adam``.
    ``weight_decay`` is torch Adam's: L2, ``g <- g + weight_decay * p`` before the
    moments (decoupled decay is :func:`adamw`). ``amsgrad`` is torch's flag: the running
    maximum of ``v`` in the denominator (see :func:`optim_jax.transforms.scale_by_adam`).

    ``moment_dtype`` stores the optimizer's per-parameter buffers in fewer bytes:
    ``"bfloat16"`` or ``"int8"`` (8-bit block-wise, Dettmers et al. 2022); see
    :mod:`optim_jax.quantization`. None keeps the parameter's dtype.
    """
    return base.chain_present(
        optional_weight_decay(weight_decay, None),
        scale_by_adam(b1, b2, eps, moment_dtype, amsgrad),
        scale_by_learning_rate(learning_rate),
    )


def adamw(
    learning_rate: base.ScalarOrSchedule,
    b1: base.ScalarOrSchedule = 0.9,
    b2: base.ScalarOrSchedule = 0.999,
    eps: float = 1e-8,
    weight_decay: base.ScalarOrSchedule = 0.01,
    mask: MaskOrFn = None,
    moment_dtype: quantization.MomentDtype = None,
    amsgrad: bool = False,
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
    :func:`optim_jax.decay_mask` for the usual choice. ``amsgrad`` is torch's flag (see
    :func:`adam`).

    ``moment_dtype`` stores the optimizer's per-parameter buffers in fewer bytes:
    ``"bfloat16"`` or ``"int8"`` (8-bit block-wise, Dettmers et al. 2022); see
    :mod:`optim_jax.quantization`. None keeps the parameter's dtype.
    """
    return base.chain_present(
        scale_by_adam(b1, b2, eps, moment_dtype, amsgrad),
        optional_weight_decay(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def lamb(
    learning_rate: base.ScalarOrSchedule,
    b1: base.ScalarOrSchedule = 0.9,
    b2: base.ScalarOrSchedule = 0.999,
    eps: float = 1e-6,
    weight_decay: base.ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    moment_dtype: quantization.MomentDtype = None,
) -> optax.GradientTransformation:
    """LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning", Algorithm 2).

    .. math::
        r_t &= \\frac{\\hat m_t}{\\sqrt{\\hat v_t} + \\epsilon}, \\qquad
        u_t = r_t + \\lambda p_{t-1} \\\\
        p_t &= p_{t-1} - \\eta_t\\,
            \\frac{\\lVert p_{t-1} \\rVert}{\\lVert u_t \\rVert}\\,u_t

    per parameter tensor, with ``m_hat, v_hat`` Adam's bias-corrected moments
    (:func:`optim_jax.transforms.scale_by_adam`) and the trust ratio set to 1
    where either norm is 0 (:func:`optim_jax.transforms.scale_by_trust_ratio`); the
    three are one transformation, :func:`optim_jax.transforms.scale_by_lamb`, so that
    on CPU the norm of ``u`` need not be written out.
    Defaults: ``b1, b2`` from the paper, ``eps = 1e-6`` from the paper's BERT
    setup and the reference TF implementation, ``weight_decay = 0`` as in Optax.

    ``mask`` (a pytree of booleans or a function of the params) excludes leaves
    from the weight decay only: the trust ratio still applies to every leaf.
    This is Optax's choice, and with it this function gives the same numbers
    as ``optax.lamb(..., eps_root=0)``. NVIDIA apex's FusedLAMB differs: it
    skips the trust ratio for parameter groups with zero weight decay and, by
    default, clips the global gradient norm to 1 first.

    ``moment_dtype`` stores the optimizer's per-parameter buffers in fewer bytes:
    ``"bfloat16"`` or ``"int8"`` (8-bit block-wise, Dettmers et al. 2022); see
    :mod:`optim_jax.quantization`. None keeps the parameter's dtype.
    """
    return optax.chain(
        scale_by_lamb(b1, b2, eps, weight_decay, mask, moment_dtype),
        scale_by_learning_rate(learning_rate),
    )


def lars(
    learning_rate: base.ScalarOrSchedule,
    momentum: base.ScalarOrSchedule = 0.9,
    weight_decay: base.ScalarOrSchedule = 0.0,
    trust_coefficient: float = 0.001,
    eps: float = 0.0,
    mask: MaskOrFn = None,
    moment_dtype: quantization.MomentDtype = None,
) -> optax.GradientTransformation:
    """LARS (You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional Networks").

    Algorithm 1 of the paper, per parameter tensor ``w``:

    .. math::
        \\lambda_t &= \\frac{\\eta\\,\\lVert w_{t-1} \\rVert}
            {\\lVert g_t \\rVert + \\beta \\lVert w_{t-1} \\rVert + \\epsilon} \\\\
        v_t &= m\\,v_{t-1} + \\gamma_t\\,\\lambda_t\\,(g_t + \\beta w_{t-1}), \\qquad
        w_t = w_{t-1} - v_t

    with ``lambda = 1`` where ``||w||`` or ``||g||`` is 0
    (:func:`optim_jax.transforms.scale_by_lars`). The global learning rate
    ``gamma_t`` sits inside the momentum buffer, as in the paper and Optax;
    timm's LARS multiplies it outside (``w -= gamma_t * v``), which is the same
    only for a constant learning rate. The chain is ``scale_by_lars``, then
    ``scale_by_learning_rate`` (which also flips the sign), then ``trace``, so
    the momentum buffer in the state holds ``-v``: the step actually applied.
    Defaults: ``momentum = 0.9`` and ``trust_coefficient = 0.001`` from the
    paper, ``eps = 0`` (the paper has none), ``weight_decay = 0`` as in Optax.

    ``mask`` marks the leaves that get weight decay and the local learning rate;
    leaves marked False (biases, normalisation parameters) take plain SGD
    momentum steps ``v = m v + gamma_t g``.

    Differs from ``optax.lars`` when ``weight_decay > 0``: Optax (like SimCLR's
    TF LARS) divides by ``||g + beta * w|| + eps`` instead of the paper's
    ``||g|| + beta * ||w|| + eps``. With ``weight_decay = 0`` the two give the
    same numbers (pass ``mask`` to Optax as both ``weight_decay_mask`` and
    ``trust_ratio_mask``).

    ``moment_dtype`` stores the optimizer's per-parameter buffers in fewer bytes:
    ``"bfloat16"`` or ``"int8"`` (8-bit block-wise, Dettmers et al. 2022); see
    :mod:`optim_jax.quantization`. None keeps the parameter's dtype.
    """
    validation.check_beta("momentum", momentum)
    return base.chain_present(
        scale_by_lars(trust_coefficient, weight_decay, eps, mask),
        scale_by_learning_rate(learning_rate),
        None if base.is_zero(momentum) else trace(momentum, moment_dtype=moment_dtype),
    )


def lion(
    learning_rate: base.ScalarOrSchedule,
    b1: base.ScalarOrSchedule = 0.9,
    b2: base.ScalarOrSchedule = 0.99,
    weight_decay: base.ScalarOrSchedule = 0.0,
    mask: MaskOrFn = None,
    moment_dtype: quantization.MomentDtype = None,
) -> optax.GradientTransformation:
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2).

    .. math::
        c_t &= \\beta_1 m_{t-1} + (1-\\beta_1) g_t, \\qquad
        p_t = p_{t-1} - \\eta_t\\,(\\operatorname{sign}(c_t) + \\lambda p_{t-1}) \\\\
        m_t &= \\beta_2 m_{t-1} + (1-\\beta_2) g_t

    (:func:`optim_jax.transforms.scale_by_lion`; ``sign(0) = 0``). Every
    coordinate moves by exactly ``eta_t`` when ``lambda = 0``, so Lion wants a
    learning rate 3-10x smaller than AdamW's and a weight decay 3-10x larger.
    One state buffer per parameter. Defaults: ``b1 = 0.9, b2 = 0.99`` from the
    paper; ``weight_decay = 0`` as lucidrains' ``lion-pytorch`` (Optax's
    ``lion`` defaults to ``1e-3``). The decay is multiplied by the learning
    rate, as in the paper, Optax and ``lion-pytorch``; ``mask`` excludes leaves
    from it. Same numbers as ``optax.lion`` given the same ``weight_decay``.

    ``moment_dtype`` stores the optimizer's per-parameter buffers in fewer bytes:
    ``"bfloat16"`` or ``"int8"`` (8-bit block-wise, Dettmers et al. 2022); see
    :mod:`optim_jax.quantization`. None keeps the parameter's dtype.
    """
    return base.chain_present(
        scale_by_lion(b1, b2, moment_dtype),
        optional_weight_decay(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def sophia(
    learning_rate: base.ScalarOrSchedule,
    b1: base.ScalarOrSchedule = 0.965,
    b2: base.ScalarOrSchedule = 0.99,
    gamma: base.ScalarOrSchedule = 0.04,
    eps: float = 1e-15,
    weight_decay: base.ScalarOrSchedule = 0.1,
    update_interval: int = 10,
    mask: MaskOrFn = None,
    moment_dtype: quantization.MomentDtype = None,
) -> optax.GradientTransformationExtraArgs:
    """Sophia (Liu et al. 2023) with the official SophiaG code's defaults.

    .. math::
        p_t = p_{t-1} - \\eta_t \\left(\\operatorname{clip}\\!\\left(
              \\frac{m_t}{\\max(\\gamma h_t, \\epsilon)}, -1, 1\\right)
              + \\lambda p_{t-1}\\right)

    ``m`` is the EMA of the gradients and ``h`` the EMA of Hessian-diagonal
    estimates, refreshed every ``update_interval`` updates from the
    ``hessian_diag=`` keyword of ``update``; see
    :func:`optim_jax.transforms.scale_by_sophia` for the rule, the comparison
    with the official code and ``optax.contrib.sophia``, and
    :mod:`optim_jax.hessian` for the estimators (Gauss-Newton-Bartlett gives
    Sophia-G, Hutchinson Sophia-H). The decay is decoupled and multiplied by the
    learning rate, as the paper's ``theta <- theta - eta*lambda*theta`` and the
    official ``p *= 1 - lr*wd``. Defaults: betas ``(0.965, 0.99)``,
    ``gamma`` = their ``rho`` = 0.04, ``eps`` = 1e-15, ``weight_decay`` = 0.1,
    ``update_interval`` = 10 (github.com/Liuhong99/Sophia). ``mask`` excludes
    leaves from the decay. The chain accepts extra keyword arguments, so
    ``tx.update(grads, state, params, hessian_diag=h)`` reaches the Sophia step.

    ``moment_dtype`` stores ``m`` and ``h`` in fewer bytes: ``"bfloat16"`` or
    ``"int8"`` (8-bit block-wise, Dettmers et al. 2022, with the signed code book
    for both: ``h`` can be negative); see :mod:`optim_jax.quantization`. None
    keeps the parameter's dtype.
    """
    return base.chain_present(
        scale_by_sophia(b1, b2, gamma, eps, update_interval, moment_dtype),
        optional_weight_decay(weight_decay, mask),
        scale_by_learning_rate(learning_rate),
    )


def adafactor(
    learning_rate: base.ScalarOrSchedule | None = None,
    eps: tuple[float, float] = (1e-30, 1e-3),
    clip_threshold: float | None = 1.0,
    decay_rate: float = -0.8,
    b1: base.ScalarOrSchedule | None = None,
    weight_decay: base.ScalarOrSchedule = 0.0,
    scale_parameter: bool = True,
    relative_step: bool | None = None,
    warmup_init: bool = False,
    min_dim_size_to_factor: int = 0,
    factored: bool = True,
    mask: MaskOrFn = None,
    moment_dtype: quantization.MomentDtype = None,
) -> optax.GradientTransformation:
    """Adafactor (Shazeer & Stern 2018) with Hugging Face ``transformers.Adafactor``'s defaults.

    .. math::
        p_t = p_{t-1} - \\alpha_t \\frac{u_t}{\\max(1, \\operatorname{RMS}(u_t)/d)}
              - \\lambda \\alpha_t p_{t-1}, \\qquad
        u_t = \\frac{g_t}{\\sqrt{\\hat v_t}}, \\qquad
        \\alpha_t = \\rho_t \\max(\\epsilon_2, \\operatorname{RMS}(p_{t-1}))

    ``v_hat`` is factored into row and column statistics for every tensor of rank
    >= 2 (over its last two axes: O(n + m) memory) and kept in full for vectors
    and scalars. See :func:`optim_jax.transforms.scale_by_adafactor` for the
    rule in full and the arguments; the chain is ``scale_by_adafactor`` (which
    applies the step size ``alpha_t`` itself, since it depends on each
    parameter's RMS and enters the first moment) and
    ``scale_by_learning_rate(1.0)``, which flips the sign.

    ``adafactor()`` uses the relative step ``rho_t = min(1e-2, 1/sqrt(t))``;
    ``adafactor(lr, scale_parameter=False)`` is the usual fine-tuning setting
    (HF's ``relative_step=False, scale_parameter=False``), with ``lr`` a number
    or a schedule.

    Defaults (the named reference, HF ``transformers.Adafactor``): relative
    step, ``scale_parameter=True``, ``eps=(1e-30, 1e-3)``, ``clip_threshold=1``,
    ``decay_rate=-0.8`` (``beta2_t = 1 - t**-0.8``), no first moment, no weight
    decay, every tensor of rank >= 2 factored. These are the paper's proposed
    hyperparameters (Algorithms 4 and 5, ``d = 1``); the first moment
    (``beta1``) and ``warmup_init`` are HF options, the weight decay
    ``p -= lambda * alpha_t * p`` is HF's.

    How the others differ:

    * ``optax.adafactor``: ``learning_rate=None`` means *no* learning rate (the
      step is ``max(1e-3, RMS(p)) * u_hat``), not the relative step; pass the
      schedule ``lambda c: jnp.minimum(1e-2, 1 / jnp.sqrt(c + 1))`` to get it.
      ``decay_rate=0.8`` is the exponent with the opposite sign, plus a
      ``decay_offset`` (nonzero values give NaN in 0.2.8); factoring
      threshold ``min_dim_size_to_factor=128`` over the two largest axes;
      ``momentum`` stored in float32 by default; ``weight_decay_rate`` is
      *not* multiplied by the step size (``p -= wd * p``); ``beta2_t`` is
      formed in float32 even under x64. With ``relative_step=False``,
      ``decay_rate=-0.8`` and ``weight_decay=0`` this function gives the same
      numbers as ``optax.adafactor(lr, min_dim_size_to_factor=N,
      multiply_by_parameter_scale=S, momentum=b1)`` up to that float32
      ``beta2_t`` (tested; rank > 2 only where the two largest axes are the
      last two).
    * T5X (``t5x.adafactor``): the same rule as Optax with a required learning
      rate, ``min_dim_size_to_factor=128`` and ``p <- (1 - wd) p - step``.
    * mesh-tensorflow's ``AdafactorOptimizer`` (the original T5 code): relative
      step ``min(1e-2, 1/sqrt(t))`` by default, multiplied by 0.05 when
      ``multiply_by_parameter_scale=False`` (HF and this function do not);
      ``min_dim_size_to_factor=32``; ``beta1=0``; no weight decay.

    ``moment_dtype`` stores the first moment (``b1``) and the full second moment
    of unfactored leaves in fewer bytes: ``"bfloat16"`` or ``"int8"`` (8-bit
    block-wise, Dettmers et al. 2022); see :mod:`optim_jax.quantization`. The
    factored row and column statistics stay float32 (O(n + m) per matrix). None
    keeps the default dtypes.
    """
    return optax.chain(
        scale_by_adafactor(
            learning_rate,
            eps=eps,
            clip_threshold=clip_threshold,
            decay_rate=decay_rate,
            b1=b1,
            weight_decay=weight_decay,
            scale_parameter=scale_parameter,
            relative_step=relative_step,
            warmup_init=warmup_init,
            min_dim_size_to_factor=min_dim_size_to_factor,
            factored=factored,
            mask=mask,
            moment_dtype=moment_dtype,
        ),
        scale_by_learning_rate(1.0),
    )
