"""Adafactor (Shazeer & Stern 2018): adaptive learning rates with sublinear memory cost.

Two transformations:

* :func:`scale_by_factored_rms`: the paper's preconditioner alone, ``g / sqrt(v_hat)``
  with a factored second moment for matrices (Algorithm 4) and a full one for
  vectors and scalars (Algorithm 5). A building block, like Optax's transform of
  the same name.
* :func:`scale_by_adafactor`: the whole Adafactor step as Hugging Face
  ``transformers.Adafactor`` (PyTorch) computes it: preconditioner, update
  clipping, relative step size, parameter scaling, optional first moment and
  decoupled weight decay. :func:`optim_jax.adafactor` chains it with
  ``scale_by_learning_rate(1.0)``, which only flips the sign.

Second-moment statistics are kept as *means*: ``v_row`` averages ``g**2 + eps1``
over the last axis and ``v_col`` over the second-to-last, where the paper keeps
sums (``R_t = (G_t^2 + eps1) 1_m``, ``C_t = 1_n^T (G_t^2 + eps1)``). The two
differ by the constant factors ``m`` and ``n``, which cancel in
``V_hat = R C / (1^T R) = v_row v_col / mean(v_row)``; means are what HF, Optax,
T5X and mesh-tensorflow store. A tensor of rank > 2 is factored over its last
two axes, one factorisation per trailing matrix (HF's rule). They are computed as
``mean(g**2) + eps1`` and the update's RMS from ``g`` and the factors, the same
values as ``mean(g**2 + eps1)`` and ``RMS(u)`` up to float rounding, in a form XLA:CPU
reduces without writing the squares or the update out (see ``_apart``).

Dtypes: arithmetic runs in float32 or wider. By default the second-moment
statistics (``v_row``, ``v_col`` and the full ``v``) are stored in that compute
dtype (float32 for bfloat16 or float32 parameters, float64 for float64 ones),
not in the parameter's dtype: with ``1 - beta2_t = t**-0.8`` below bfloat16's
resolution (``t`` beyond a few hundred steps) a bfloat16 statistic would stop
changing. The first moment (``b1``) is stored in the parameter's dtype, as in
the other transformations of this library.

``moment_dtype`` of :func:`scale_by_adafactor` (see :mod:`optim_jax.quantization`)
stores the per-parameter buffers in fewer bytes: the first moment (signed) and
the full second moment ``v`` of the unfactored leaves (unsigned: ``g**2 + eps1``
averages are never negative). The factored ``v_row`` and ``v_col`` always stay
in the compute dtype: they cost O(n + m) for an ``n x m`` matrix, a fraction
``1/n + 1/m`` of a full moment, so shrinking them would save next to nothing.
With ``"bfloat16"`` the unfactored ``v`` meets the limit above: after about
10^3 steps its relative increments ``t**-0.8 (g**2 / v - 1)`` fall below
bfloat16's resolution and round away. ``"int8"`` leaves tensors below 4096
values in float32, which covers the usual unfactored leaves (biases, norm
scales).

On the flat multi-tensor layout (:mod:`optim_jax.flat`) both transformations
work on stacks of same-shaped tensors (the ``k`` layers' query kernels as one
``(k, d, d)`` array): the same statistics per tensor, reduced in another order
(float32 rounding), a compiled step that grows with the number of distinct
shapes rather than of tensors, and a state that :func:`optim_jax.flat.unflatten`
gives back per leaf. Build that layout with ``flat_layout(params, by_shape=True)``:
on one buffer per dtype, XLA:CPU copies each stack out of its buffer for the
reductions (60 instead of 28 bytes per parameter). int8 moments refuse the layout.

State leaves derived from a parameter keep its sharding under ``jax.jit``: the
full buffers come from :func:`optim_jax.base.zeros_like_param`, and the row and
column statistics are reductions of such a buffer, through which XLA propagates
the parameter's sharding of the remaining axes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim_jax import base, flat, quantization, validation
from optim_jax.transforms.weight_decay import MaskOrFn


def is_factored(shape: tuple[int, ...], factored: bool = True, min_dim_size_to_factor: int = 0):
    """Whether a parameter of ``shape`` gets row and column statistics instead of a full one.

    True when ``factored``, the rank is at least 2 and both of the last two
    dimensions are at least ``min_dim_size_to_factor``. ``0`` (the default of
    this library) factors every tensor of rank >= 2, as HF ``Adafactor`` does;
    ``128`` gives Optax's and T5X's default threshold. For rank 2 the rule is
    the same as Optax's ("the second-largest dimension is at least the
    threshold"); for rank > 2 Optax, T5X and mesh-tensorflow factor the two
    *largest* axes wherever they are, this library (like HF) the last two.
    """
    return factored and len(shape) >= 2 and min(shape[-2], shape[-1]) >= min_dim_size_to_factor


def _map_leaves(
    fn: Callable[..., tuple],
    n_outputs: int,
    tree: Any,
    *rest: Any,
    flat_outputs: Sequence[int] = (),
) -> tuple:
    """``fn(lead, *leaves)`` for each leaf, allowing an output to be None for some leaves.

    Adafactor keeps row and column statistics for factored leaves and a full
    statistic for the others, so each of those state trees holds None at the
    leaves that do not use it (no memory, no placeholder arrays). ``lead`` is the
    number of axes before each tensor's own: 0 per leaf; 1 on the flat layout,
    where ``fn`` gets each run of same-shaped tensors stacked (:func:`flat.map_runs`,
    one compiled piece per kind of tensor) and per-leaf Python values (masks) as
    tuples. ``flat_outputs`` are those that come back as :class:`flat.FlatParams`
    there (the update); the state comes back as :class:`flat.RunStacks`.
    """
    if flat.is_flat(tree):
        return flat.map_runs(
            lambda *args: fn(1, *args), n_outputs, tree, *rest, flat_outputs=flat_outputs
        )
    leaves, treedef = jax.tree.flatten(tree)
    rest_leaves = [treedef.flatten_up_to(r) for r in rest]
    outputs = [fn(0, *args) for args in zip(leaves, *rest_leaves, strict=True)]
    return tuple(treedef.unflatten([out[i] for out in outputs]) for i in range(n_outputs))


def _tensor_mean(x: base.Array, lead: int) -> base.Array:
    """The mean over each tensor's own axes (all of them per leaf, so a scalar); with
    ``lead`` stacked axes first, one mean per tensor, broadcastable against ``x``."""
    if not lead:
        return jnp.mean(x)
    return jnp.mean(x, axis=tuple(range(lead, x.ndim)), keepdims=True)


def _per_tensor(values: tuple, like: base.Array) -> base.Array:
    """Python values, one per stacked tensor, broadcastable against the stack ``like``."""
    return jnp.asarray(values, like.dtype).reshape((len(values),) + (1,) * (like.ndim - 1))


def _init_second_moment(
    param: base.Array, factor: bool, moment_dtype: quantization.MomentDtype = None
) -> tuple:
    """``(v_row, v_col, v)`` zeros for one parameter: the factored statistics in the compute
    dtype, the full ``v`` in ``moment_dtype`` (None: the compute dtype, not the parameter's)."""
    dtype = base.compute_dtype(param.dtype)
    zeros = base.zeros_like_param(param, dtype)
    if factor:
        return zeros.sum(axis=-1), zeros.sum(axis=-2), None
    if moment_dtype is None:
        return None, None, zeros
    return None, None, quantization.init(param, moment_dtype, signed=False)


def _decay(count: base.Array, decay_rate: float) -> tuple[base.Array, base.Array]:
    """``(beta2_t, 1 - beta2_t)`` with ``beta2_t = 1 - t**decay_rate``, ``t = count`` from 1."""
    t = count.astype(jnp.result_type(float))
    mix = t**decay_rate
    return 1 - mix, mix


def _apart(*xs: base.Array) -> tuple[base.Array, ...]:
    """``xs`` unchanged, on CPU as values of their own, for a reduction's input.

    XLA:CPU's reduction kernels read stored inputs: an operand that a reduction shares
    with another kernel is written out at the parameter's size and read back, and on CPU
    each step maps such a temporary afresh (a page fault per 4 KiB). Adafactor's
    reductions would share ``g * g + eps1`` (the row and the column statistics) and the
    broadcast row and column factors, or an unfactored leaf's full statistic (the update
    and its RMS). Given values of their own (an optimisation barrier, which moves no data),
    each reduction computes its input as it reads: 28 bytes per float32 parameter of a
    factored step instead of 44, 40 instead of 44 unfactored. Elsewhere the values
    themselves, so that XLA may fuse sibling reductions into one pass.
    """
    return jax.lax.platform_dependent(
        *xs, cpu=lambda *xs: jax.lax.optimization_barrier(xs), default=lambda *xs: xs
    )


def _precondition(
    g, v_row, v_col, v, beta2, mix, eps1, lead: int = 0, store=quantization.write
) -> tuple:
    """``(u, mean(u**2), new_row, new_col, new_v)`` with ``u = g / sqrt(v_hat)``; ``g`` is
    already in the compute dtype, with ``lead`` stacked axes (the mean is per tensor);
    ``store`` writes an unfactored statistic (:func:`quantization.writer`)."""
    # Under jax_enable_x64 the decay is float64: it would promote a float32 statistic.
    beta2, mix = beta2.astype(g.dtype), mix.astype(g.dtype)
    if v_row is not None:
        g_rows, g_cols = _apart(g, g)
        # mean(g**2) + eps1 is mean(g**2 + eps1); on CPU eps1 inside the mean would be a
        # broadcast array of the parameter's size, stored for the reduction kernel.
        new_row = beta2 * v_row.astype(g.dtype) + mix * (jnp.mean(g_rows * g_rows, axis=-1) + eps1)
        new_col = beta2 * v_col.astype(g.dtype) + mix * (jnp.mean(g_cols * g_cols, axis=-2) + eps1)
        # v_hat = new_row[:, None] * new_col[None, :] / mean(new_row), per trailing matrix.
        # The ratio new_row / mean(new_row) is never formed: for an all-zero row
        # (eps1 = 1e-30) beside rows of g ~ 1e4 it is below float32's smallest
        # normal, XLA flushes it to 0, and rsqrt(0) * 0 would put NaN in the leaf.
        # For the same reason mean(u**2) squares g * row_factor, never row_factor alone.
        row_factor = jax.lax.rsqrt(new_row) * jnp.sqrt(jnp.mean(new_row, axis=-1, keepdims=True))
        col_factor = jax.lax.rsqrt(new_col)

        def preconditioned(row_factor, col_factor):
            return g * row_factor[..., :, None] * col_factor[..., None, :]

        u = preconditioned(row_factor, col_factor)
        apart = preconditioned(*_apart(row_factor, col_factor))
        mean_square = _tensor_mean(jnp.square(apart), lead)
        return u, mean_square, new_row.astype(v_row.dtype), new_col.astype(v_col.dtype), None
    new_v = beta2 * quantization.read(v, g.dtype) + mix * (g * g + eps1)
    u = g * jax.lax.rsqrt(new_v)
    if quantization.is_moment(v) or v.dtype != g.dtype:  # new_v is not what is stored
        return u, _tensor_mean(u * u, lead), None, None, store(new_v, v)
    # From the stored statistic, kept apart: XLA:CPU then reduces g and new_v as it reads
    # them instead of writing u out for the reduction (44 -> 40 B/param, no temporary).
    (stored,) = _apart(new_v)
    mean_square = _tensor_mean(jnp.square(g * jax.lax.rsqrt(stored)), lead)
    return u, mean_square, None, None, new_v


def _rms(x: base.Array, lead: int) -> base.Array:
    return jnp.sqrt(_tensor_mean(x * x, lead))


def _check_factoring(factored: bool, min_dim_size_to_factor: int) -> None:
    if not isinstance(factored, bool):
        raise TypeError(f"factored must be a bool, got {factored!r}")
    validation.check_non_negative_int("min_dim_size_to_factor", min_dim_size_to_factor)


def _check_decay_rate(decay_rate: float) -> None:
    if callable(decay_rate):
        raise TypeError("decay_rate must be a number (the exponent of t), not a schedule")
    validation.check_in_range("decay_rate", decay_rate, -math.inf, 0.0)


class FactoredRmsState(NamedTuple):
    count: jax.Array  # updates applied so far
    v_row: base.Updates  # mean of g^2 + eps over the last axis; None for unfactored leaves
    v_col: base.Updates  # mean of g^2 + eps over the second-to-last axis; None likewise
    v: base.Updates  # full second moment; None for factored leaves


def scale_by_factored_rms(
    decay_rate: float = -0.8,
    eps: float = 1e-30,
    min_dim_size_to_factor: int = 0,
    factored: bool = True,
) -> optax.GradientTransformation:
    """Adafactor's preconditioner: ``u = g / sqrt(v_hat)`` (Algorithms 4 and 5 of the paper).

    .. math::
        \\beta_{2,t} &= 1 - t^{c}, \\quad t = 1, 2, \\dots \\\\
        r_t &= \\beta_{2,t} r_{t-1} + (1-\\beta_{2,t})\\,
              \\operatorname{mean}_{\\text{cols}}(g_t^2 + \\epsilon_1), \\qquad
        c_t = \\beta_{2,t} c_{t-1} + (1-\\beta_{2,t})\\,
              \\operatorname{mean}_{\\text{rows}}(g_t^2 + \\epsilon_1) \\\\
        \\hat v_t &= r_t c_t^\\top / \\operatorname{mean}(r_t), \\qquad
        u_t = g_t / \\sqrt{\\hat v_t}

    for leaves that :func:`is_factored`; the others keep a full
    ``v_t = beta2_t v_{t-1} + (1 - beta2_t)(g_t^2 + eps1)``. ``c = decay_rate``
    uses HF's sign convention (``-0.8``, the paper's ``beta2_t = 1 - t**-0.8``).

    Same numbers as ``optax.scale_by_factored_rms(decay_rate=-decay_rate,
    min_dim_size_to_factor=..., epsilon=eps)`` on rank-2 leaves and on leaves
    whose two largest axes are the last two, except that Optax forms
    ``beta2_t`` in float32 even under ``jax_enable_x64``. Optax's defaults
    differ: ``min_dim_size_to_factor=128``; it also offers a ``step_offset``.
    """
    _check_decay_rate(decay_rate)
    validation.check_non_negative("eps", eps)
    _check_factoring(factored, min_dim_size_to_factor)

    def init_fn(params):
        base.refuse_complex(params, "scale_by_factored_rms")

        def one(lead, p):
            factor = is_factored(p.shape[lead:], factored, min_dim_size_to_factor)
            return _init_second_moment(p, factor)

        v_row, v_col, v = _map_leaves(one, 3, params)
        return FactoredRmsState(count=base.init_count(), v_row=v_row, v_col=v_col, v=v)

    def update_fn(updates, state, params=None):
        del params
        count = base.increment_count(state.count)
        beta2, mix = _decay(count, decay_rate)

        def one(lead, g, v_row, v_col, v):
            g32 = g.astype(base.compute_dtype(g.dtype))
            u, _, new_row, new_col, new_v = _precondition(
                g32, v_row, v_col, v, beta2, mix, eps, lead
            )
            return u.astype(g.dtype), new_row, new_col, new_v

        out, v_row, v_col, v = _map_leaves(
            one, 4, updates, state.v_row, state.v_col, state.v, flat_outputs=(0,)
        )
        return out, FactoredRmsState(count=count, v_row=v_row, v_col=v_col, v=v)

    return optax.GradientTransformation(init_fn, update_fn)


class AdafactorState(NamedTuple):
    count: jax.Array  # updates applied so far
    v_row: base.Updates  # see FactoredRmsState; compute dtype (float32 or wider)
    v_col: base.Updates
    v: base.Updates  # compute dtype, or moment_dtype
    # First moment of the scaled steps (only with b1): the param dtype, or moment_dtype.
    mu: base.Updates | None


def _uses(value: base.ScalarOrSchedule | None) -> bool:
    """Whether an optional coefficient can be non-zero (a schedule always can)."""
    return value is not None and not base.is_zero(value)


def scale_by_adafactor(
    learning_rate: base.ScalarOrSchedule | None = None,
    *,
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
    """The Adafactor step of Hugging Face ``transformers.Adafactor``, learning rate included.

    With ``u_t = g_t / sqrt(v_hat_t)`` from :func:`scale_by_factored_rms`:

    .. math::
        \\hat u_t &= u_t / \\max(1, \\operatorname{RMS}(u_t) / d) \\\\
        \\rho_t &= \\min(10^{-2}, 1/\\sqrt t)
            \\;\\; (\\min(10^{-6} t, 1/\\sqrt t) \\text{ with warmup\\_init})
            \\text{ or } \\eta_{t-1} \\text{ (a manual learning rate)} \\\\
        \\alpha_t &= \\rho_t \\max(\\epsilon_2, \\operatorname{RMS}(p_{t-1}))
            \\;\\; (\\rho_t \\text{ without scale\\_parameter}) \\\\
        s_t &= \\alpha_t \\hat u_t, \\quad\\text{or with } \\beta_1:\\;
            m_t = \\beta_1 m_{t-1} + (1-\\beta_1)\\,\\alpha_t \\hat u_t,\\; s_t = m_t \\\\
        p_t &= p_{t-1} - s_t - \\lambda \\alpha_t p_{t-1}

    RMS is taken over each parameter tensor. The transformation returns
    ``s_t + lambda * alpha_t * p_{t-1}`` (the amount to *subtract*); the
    optimizer :func:`optim_jax.adafactor` ends the chain with
    ``scale_by_learning_rate(1.0)`` to flip the sign. The step size ``alpha_t``
    has to live here, not in that last link: it depends on each parameter's RMS,
    the first moment averages already-scaled steps (HF and mesh-tensorflow
    order, which differs from scaling afterwards once the learning rate varies)
    and the weight decay is multiplied by ``alpha_t``.

    Args:
      learning_rate: None (default) for the relative step ``rho_t``; otherwise a
        number or a schedule ``count -> lr`` (``count`` = updates already
        applied), which then requires ``relative_step`` False or None.
      eps: ``(eps1, eps2)``: added to ``g**2`` before averaging, and the lower
        bound of the parameter scale.
      clip_threshold: ``d``; None disables update clipping.
      decay_rate: ``c`` in ``beta2_t = 1 - t**c`` (HF's sign convention, <= 0).
      b1: first-moment coefficient; None or 0 keeps no first moment (0 would
        give the same numbers with an extra buffer).
      weight_decay: ``lambda``, decoupled and multiplied by ``alpha_t``.
      scale_parameter: multiply the step size by ``max(eps2, RMS(p))``.
      relative_step: None derives it from ``learning_rate`` (True when it is
        None); True with a ``learning_rate`` is an error, as in HF.
      warmup_init: the relative step ``min(1e-6 t, 1/sqrt t)``; needs the relative step.
      min_dim_size_to_factor, factored: which leaves are factored (:func:`is_factored`).
      mask: a pytree of Python booleans with the structure of the parameters,
        or a function of the parameters returning one (it may look at shapes,
        not values); leaves marked False get no weight decay. None decays
        every leaf (HF has no mask).
      moment_dtype: how the first moment and the full second moment of
        unfactored leaves are stored: None (the first moment in the parameter's
        dtype, ``v`` in the compute dtype), ``"float32"``, ``"bfloat16"`` or
        ``"int8"`` (block-wise 8-bit; see :mod:`optim_jax.quantization`). The
        factored row and column statistics stay in the compute dtype (see the
        module docstring).
    """
    if relative_step is None:
        relative_step = learning_rate is None
    if relative_step and learning_rate is not None:
        raise ValueError(
            "learning_rate must be None when relative_step=True (the step size is then "
            "min(1e-2, 1/sqrt(t))); pass relative_step=False to use a manual learning_rate"
        )
    if not relative_step and learning_rate is None:
        raise ValueError("learning_rate is required when relative_step=False")
    if warmup_init and not relative_step:
        raise ValueError("warmup_init=True requires relative_step=True (learning_rate=None)")
    if learning_rate is not None:
        validation.check_non_negative("learning_rate", learning_rate)
    if not isinstance(eps, tuple | list) or len(eps) != 2:
        raise ValueError(f"eps must be a pair (eps1, eps2), got {eps!r}")
    eps1, eps2 = eps
    validation.check_non_negative("eps[0] (eps1)", eps1)
    validation.check_non_negative("eps[1] (eps2)", eps2)
    if clip_threshold is not None:
        validation.check_positive("clip_threshold", clip_threshold)
    _check_decay_rate(decay_rate)
    if b1 is not None:
        validation.check_beta("b1", b1)
    validation.check_non_negative("weight_decay", weight_decay)
    _check_factoring(factored, min_dim_size_to_factor)
    quantization.moment_format(moment_dtype)  # a bad value is an error here, not at init
    use_momentum = _uses(b1)
    use_decay = _uses(weight_decay)

    def init_fn(params):
        base.refuse_complex(params, "scale_by_adafactor")
        quantization.check_layout(params, moment_dtype)

        def one(lead, p):
            factor = is_factored(p.shape[lead:], factored, min_dim_size_to_factor)
            v_row, v_col, v = _init_second_moment(p, factor, moment_dtype)
            mu = quantization.init(p, moment_dtype, signed=True) if use_momentum else None
            return v_row, v_col, v, mu

        v_row, v_col, v, mu = _map_leaves(one, 4, params)
        return AdafactorState(
            count=base.init_count(),
            v_row=v_row,
            v_col=v_col,
            v=v,
            mu=mu if use_momentum else None,
        )

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_adafactor needs `params` in update(); pass them.")
        count = base.increment_count(state.count)
        beta2, mix = _decay(count, decay_rate)
        if relative_step:
            t = count.astype(jnp.result_type(float))
            start = 1e-6 * t if warmup_init else 1e-2
            rho = jnp.minimum(start, jax.lax.rsqrt(t))
        else:
            rho = base.resolve(learning_rate, state.count)
        beta1 = base.resolve(b1, state.count) if use_momentum else None
        wd = base.resolve(weight_decay, state.count)
        store = quantization.writer(moment_dtype, state.count)
        # Masks choose tensors by name and shape: on the flat layout, from the per-leaf view.
        view = params.layout.abstract_leaves() if flat.is_flat(params) else params
        if mask is None:
            decay_mask = jax.tree.map(lambda _: True, view)
        else:
            decay_mask = mask(view) if callable(mask) else mask

        def one(lead, g, p, v_row, v_col, v, m, decay_leaf):
            cdt = base.compute_dtype(g.dtype)
            g32, p32 = g.astype(cdt), p.astype(cdt)
            u, mean_square, new_row, new_col, new_v = _precondition(
                g32, v_row, v_col, v, beta2, mix, eps1, lead, store
            )
            if clip_threshold is not None:
                u = u / jnp.maximum(1.0, jnp.sqrt(mean_square) / clip_threshold)
            if scale_parameter:
                # A stack is a view of its buffer: on CPU its RMS reads a value of its own, or
                # XLA:CPU copies the buffer out for the reduction (a temporary per step).
                (p_rms,) = _apart(p32) if lead else (p32,)
                alpha = rho * jnp.maximum(eps2, _rms(p_rms, lead))
            else:
                alpha = rho
            step = alpha * u
            new_m = None
            if use_momentum:
                step = beta1 * quantization.read(m, cdt) + (1 - beta1) * step
                new_m = store(step, m)
            decayed = decay_leaf if lead else (decay_leaf,)
            rate = None
            if use_decay and any(decayed):
                rate = wd * alpha if all(decayed) else wd * alpha * _per_tensor(decayed, p32)
            if lead and use_decay:
                # On the flat layout the decay is added to the buffers in their own shape
                # (below): read through a stack's view, the parameters would be written to a
                # new buffer instead of in place.
                rate = jnp.broadcast_to(0.0 if rate is None else rate, step.shape).astype(cdt)
                return step, rate, new_row, new_col, new_v, new_m
            if rate is not None:
                step = step + rate * p32
            return step.astype(g.dtype), None, new_row, new_col, new_v, new_m

        none_tree = jax.tree.map(lambda _: None, view)
        out, decay_scale, v_row, v_col, v, mu = _map_leaves(
            one,
            6,
            updates,
            params,
            state.v_row,
            state.v_col,
            state.v,
            state.mu if use_momentum else none_tree,
            decay_mask,
            flat_outputs=(0, 1),
        )
        if flat.is_flat(updates) and use_decay:
            out = jax.tree.map(
                lambda s, r, p, g: (s + r * p.astype(s.dtype)).astype(g.dtype),
                out,
                decay_scale,
                params,
                updates,
            )
        new_state = AdafactorState(
            count=count, v_row=v_row, v_col=v_col, v=v, mu=mu if use_momentum else None
        )
        return out, new_state

    return optax.GradientTransformation(init_fn, update_fn)
