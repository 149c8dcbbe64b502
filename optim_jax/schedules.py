"""Schedules: functions ``step -> value`` for learning rates and other hyperparameters.

Step convention (the same for every schedule here, and Optax's):

    ``schedule(t)`` is the value used for the ``(t + 1)``-th optimizer update,
    ``t = 0, 1, 2, ...``: it is what :func:`optim_jax.base.resolve` passes (the
    number of updates already applied). It equals torch's
    ``scheduler.get_last_lr()[0]`` after ``t`` calls to ``scheduler.step()`` in
    the usual loop ``optimizer.step(); scheduler.step()``.

Every builder checks its arguments when called (a ``ValueError`` naming the
argument) and returns a pure function of an integer step: a Python int or an
integer array of any shape, evaluated elementwise, under ``jax.jit`` and
``jax.vmap`` alike. Negative steps count as 0. The value comes back in the
default float dtype (float32, or float64 with x64 enabled).

Shared rules:

* Value arguments (``init_value``, ``peak_value``, ``end_value``, ...) are
  finite and ``>= 0``: they are learning rates, momenta or decay factors. They
  may also be traced scalars, so a schedule can be built inside ``jax.grad``
  (a meta-gradient with respect to its peak) or ``jax.vmap`` (a sweep over
  peaks in one program); traced values are not checked. Lengths, periods,
  milestones and ``one_cycle``'s ``pct_start`` place the transitions and must
  be numbers.
* Lengths (``*_steps``) are integers ``>= 0``; a length of 0 means that
  transition happens at once. Periods (``step_size``, ``T_0``, ...) are ``>= 1``.
* After its last transition a schedule holds its final value forever. Where
  torch does something else past that point (``CosineAnnealingLR`` keeps
  oscillating, ``OneCycleLR`` raises), the docstring says so.
* Powers of a decay factor ``gamma ** n`` are computed as
  ``exp(n * log(gamma))`` with the logarithm taken in double precision (of a
  traced ``gamma``: in its own precision), which keeps float32 values within a
  few ulp for ``gamma`` close to 1.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from optim_jax import validation
from optim_jax.base import Array, Schedule

AnnealStrategy = Literal["cos", "linear"]

__all__ = [
    "constant",
    "cosine_decay",
    "cosine_warm_restarts",
    "exponential_decay",
    "inverse_sqrt",
    "join_schedules",
    "linear",
    "multistep_decay",
    "one_cycle",
    "one_cycle_momentum",
    "polynomial_decay",
    "step_decay",
    "warmup_cosine_decay",
    "warmup_linear_decay",
]


# --------------------------------------------------------------------------- argument checks


def _check_value(name: str, value: Any, *, positive: bool = False) -> float | Array:
    """A finite number ``>= 0`` (``> 0`` if ``positive``), returned as a Python float; a
    traced scalar (a schedule built under ``jax.grad`` or ``jax.vmap``) as it is, unchecked."""
    if callable(value):
        raise TypeError(f"{name} must be a number, got a callable")
    if positive:
        validation.check_positive(name, value)
    else:
        validation.check_non_negative(name, value)
    if isinstance(value, jax.core.Tracer):
        return value
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {number}")
    return number


def _check_values(**values: Any) -> None:
    """:func:`_check_value` on each keyword, so a composite schedule names its own arguments."""
    for name, value in values.items():
        _check_value(name, value)


def _check_int(name: str, value: Any, minimum: int) -> int:
    """An integer ``>= minimum`` (NumPy integers accepted, bools and floats not)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {number}")
    return number


def _check_non_decreasing_ints(name: str, values: Sequence[Any]) -> list[int]:
    numbers = [_check_int(f"{name}[{i}]", v, 0) for i, v in enumerate(values)]
    for i in range(1, len(numbers)):
        if numbers[i] < numbers[i - 1]:
            raise ValueError(f"{name} must be non-decreasing, got {numbers}")
    return numbers


def _check_anneal(name: str, value: str) -> Callable[[Any, Any, Array], Array]:
    if value not in _ANNEALERS:
        raise ValueError(f"{name} must be one of {sorted(_ANNEALERS)}, got {value!r}")
    return _ANNEALERS[value]


# --------------------------------------------------------------------------- shared pieces


def _float_dtype() -> jnp.dtype:
    return jax.dtypes.canonicalize_dtype(float)


def _as_float(x: Array) -> Array:
    return jnp.asarray(x).astype(_float_dtype())


def _steps(step: int | Array) -> Array:
    """The step as a signed integer array (``t - begin`` must not wrap), negatives clamped to 0."""
    t = jnp.asarray(step)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise TypeError(f"a schedule takes an integer step, got dtype {t.dtype}")
    if jnp.issubdtype(t.dtype, jnp.unsignedinteger):
        t = t.astype(jax.dtypes.canonicalize_dtype(int))
    return jnp.maximum(t, 0)


def _progress(t: Array, length: int, begin: int = 0) -> Array:
    """Fraction in [0, 1] of a transition over ``[begin, begin + length]``: ``clip((t-B)/L)``.

    A length of 0 gives a jump from 0 to 1 at ``begin``. The clipping is done
    on integers, so steps far past the end never meet float rounding. The final
    ``min`` is needed: under ``jit`` XLA turns a division by a constant into a
    multiplication by its reciprocal, which can land one ulp above 1.
    """
    if length == 0:
        return _as_float(t >= begin)
    return jnp.minimum(_as_float(jnp.clip(t - begin, 0, length)) / length, 1.0)


def _remaining(t: Array, length: int) -> Array:
    """``1 - _progress(t, length)``, formed as ``(L - min(t, L)) / L``: exactly 0 from ``L`` on,
    never negative (a base for fractional powers), and accurate near the end in float32."""
    if length == 0:
        return jnp.zeros(t.shape, _float_dtype())
    return _as_float(length - jnp.clip(t, 0, length)) / length


def _anneal_linear(start: Any, end: Any, frac: Array) -> Array:
    """``start + (end - start) * frac``, written as a blend so both ends come out exact."""
    return start * (1.0 - frac) + end * frac


def _anneal_cos(start: Any, end: Any, frac: Array) -> Array:
    """``end + (start - end) * (1 + cos(pi * frac)) / 2``: from ``start`` at 0 to ``end`` at 1."""
    return end + (start - end) / 2.0 * (jnp.cos(jnp.pi * frac) + 1.0)


_ANNEALERS: dict[str, Callable[[Any, Any, Array], Array]] = {
    "cos": _anneal_cos,
    "linear": _anneal_linear,
}


def _power(base: float | Array, exponent: Array) -> Array:
    """``base ** exponent`` for ``base >= 0`` (``0 ** 0 = 1``): a Python number's logarithm
    in double precision; a traced one's in the array's, kept off 0 so that its gradient
    stays finite."""
    exponent = _as_float(exponent)
    if isinstance(base, jax.core.Tracer):
        positive = base > 0
        log_base = jnp.log(jnp.where(positive, base, 1.0))
        return jnp.where(positive, jnp.exp(exponent * log_base), _as_float(exponent == 0))
    if base == 0.0:
        return _as_float(exponent == 0)
    return jnp.exp(exponent * math.log(base))


def _reachable(t: Array, thresholds: Sequence[int]) -> list[int]:
    """The thresholds a step of ``t``'s integer dtype can reach (the rest never apply)."""
    limit = int(jnp.iinfo(t.dtype).max)
    return [b for b in thresholds if b <= limit]


def _count_reached(t: Array, thresholds: Sequence[int]) -> Array:
    """How many of the (sorted, possibly repeated) ``thresholds`` are ``<= t``, elementwise."""
    reachable = _reachable(t, thresholds)
    if not reachable:
        return jnp.zeros(t.shape, jnp.int32)
    table = jnp.asarray(reachable, t.dtype)
    return jnp.sum(t[..., None] >= table, axis=-1, dtype=jnp.int32)


# --------------------------------------------------------------------------- basic shapes


def constant(value: float) -> Schedule:
    """``value`` at every step (torch: no scheduler, or ``ConstantLR`` with factor 1)."""
    value = _check_value("value", value)

    def schedule(step: int | Array) -> Array:
        return jnp.full(jnp.shape(_steps(step)), value, _float_dtype())

    return schedule


def linear(
    init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0
) -> Schedule:
    """Linear interpolation from ``init_value`` to ``end_value``, then held.

    .. math::
        v(t) = v_0 + (v_1 - v_0)\\,\\mathrm{clip}\\!\\left(\\frac{t - B}{T}, 0, 1\\right)

    torch: ``LinearLR(start_factor=a, end_factor=b, total_iters=T)`` on a base
    learning rate ``lr`` is ``linear(a * lr, b * lr, T)``. Optax:
    ``linear_schedule`` gives the same values for ``T >= 1``; for ``T = 0`` Optax
    holds ``init_value`` while this schedule jumps to ``end_value`` at ``B``.
    """
    init_value = _check_value("init_value", init_value)
    end_value = _check_value("end_value", end_value)
    transition_steps = _check_int("transition_steps", transition_steps, 0)
    transition_begin = _check_int("transition_begin", transition_begin, 0)

    def schedule(step: int | Array) -> Array:
        frac = _progress(_steps(step), transition_steps, transition_begin)
        return _anneal_linear(init_value, end_value, frac)

    return schedule


def cosine_decay(init_value: float, decay_steps: int, end_value: float = 0.0) -> Schedule:
    """Half a cosine from ``init_value`` at step 0 to ``end_value`` at ``decay_steps``, then held.

    .. math::
        v(t) = v_1 + \\tfrac12 (v_0 - v_1)\\left(1 + \\cos\\frac{\\pi \\min(t, T)}{T}\\right)

    (Loshchilov & Hutter, 2017, without restarts.) torch:
    ``CosineAnnealingLR(T_max=T, eta_min=end_value)`` gives the same values for
    ``t <= T``; past ``T`` torch keeps following the cosine back up (period
    ``2T``) while this schedule holds ``end_value``. Optax:
    ``cosine_decay_schedule(init_value, T, alpha=end_value / init_value)``.
    """
    init_value = _check_value("init_value", init_value)
    end_value = _check_value("end_value", end_value)
    decay_steps = _check_int("decay_steps", decay_steps, 0)

    def schedule(step: int | Array) -> Array:
        return _anneal_cos(init_value, end_value, _progress(_steps(step), decay_steps))

    return schedule


def polynomial_decay(
    init_value: float, decay_steps: int, end_value: float = 0.0, power: float = 1.0
) -> Schedule:
    """Polynomial decay from ``init_value`` to ``end_value`` over ``decay_steps``, then held.

    .. math::
        v(t) = v_1 + (v_0 - v_1)\\left(1 - \\frac{\\min(t, T)}{T}\\right)^{p}

    torch: ``PolynomialLR(total_iters=T, power=p)`` is ``end_value=0``. Optax:
    ``polynomial_schedule(init_value, end_value, p, T)``.
    """
    init_value = _check_value("init_value", init_value)
    end_value = _check_value("end_value", end_value)
    decay_steps = _check_int("decay_steps", decay_steps, 0)
    power = _check_value("power", power, positive=True)

    def schedule(step: int | Array) -> Array:
        remaining = _remaining(_steps(step), decay_steps)
        return end_value + (init_value - end_value) * remaining**power

    return schedule


# --------------------------------------------------------------------------- multiplicative decays


def exponential_decay(
    init_value: float, gamma: float, transition_steps: int = 1, staircase: bool = False
) -> Schedule:
    """``init_value * gamma ** (t / transition_steps)``; ``floor`` of the exponent if ``staircase``.

    torch: ``ExponentialLR(gamma)`` is the default ``transition_steps=1``;
    ``StepLR(step_size, gamma)`` is ``staircase=True`` (see :func:`step_decay`).
    Optax: ``exponential_decay(init_value, transition_steps, gamma, staircase=...)``.
    """
    init_value = _check_value("init_value", init_value)
    gamma = _check_value("gamma", gamma)
    transition_steps = _check_int("transition_steps", transition_steps, 1)

    def schedule(step: int | Array) -> Array:
        t = _steps(step)
        exponent = t // transition_steps if staircase else _as_float(t) / transition_steps
        return init_value * _power(gamma, exponent)

    return schedule


def step_decay(init_value: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """``init_value * gamma ** floor(t / step_size)``: torch ``StepLR(step_size, gamma)``."""
    step_size = _check_int("step_size", step_size, 1)
    return exponential_decay(init_value, gamma, step_size, staircase=True)


def multistep_decay(init_value: float, milestones: Sequence[int], gamma: float = 0.1) -> Schedule:
    """``init_value * gamma ** n(t)``, ``n(t)`` the number of milestones ``<= t``.

    torch: ``MultiStepLR(milestones, gamma)``. As there (a ``Counter``), a
    milestone listed ``k`` times multiplies by ``gamma ** k``. Milestones must be
    non-decreasing integers ``>= 0``.
    """
    init_value = _check_value("init_value", init_value)
    gamma = _check_value("gamma", gamma)
    milestones = _check_non_decreasing_ints("milestones", milestones)

    def schedule(step: int | Array) -> Array:
        return init_value * _power(gamma, _count_reached(_steps(step), milestones))

    return schedule


# --------------------------------------------------------------------------- composition


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """``schedules[i](t - boundaries[i-1])`` for ``boundaries[i-1] <= t < boundaries[i]``.

    ``schedules[0]`` runs from step 0 (called with ``t`` itself) and the last one
    forever after the last boundary. Each piece restarts its own count at its
    boundary. The same convention and values as ``optax.join_schedules``, which
    does not check the boundaries; here they must be non-decreasing integers
    ``>= 0`` (an empty piece is allowed), one fewer than the schedules.
    """
    schedules = list(schedules)
    if not schedules:
        raise ValueError("schedules must not be empty")
    for i, piece in enumerate(schedules):
        if not callable(piece):
            raise TypeError(f"schedules[{i}] must be callable, got {piece!r}")
    boundaries = _check_non_decreasing_ints("boundaries", boundaries)
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(
            f"boundaries must have one entry fewer than schedules: got {len(boundaries)} "
            f"boundaries for {len(schedules)} schedules"
        )

    def schedule(step: int | Array) -> Array:
        t = _steps(step)
        value = jnp.broadcast_to(_as_float(schedules[0](t)), t.shape)
        for boundary, piece in zip(_reachable(t, boundaries), schedules[1:], strict=False):
            value = jnp.where(t < boundary, value, _as_float(piece(t - boundary)))
        return value

    return schedule


def warmup_cosine_decay(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
) -> Schedule:
    """Linear warm-up ``init_value -> peak_value``, then cosine decay to ``end_value``.

    .. math::
        v(t) = \\begin{cases}
            v_0 + (v_p - v_0)\\, t / W & t < W \\\\
            v_1 + \\tfrac12 (v_p - v_1)\\left(1 + \\cos\\frac{\\pi (\\min(t, T) - W)}{T - W}\\right)
            & t \\ge W
        \\end{cases}

    ``decay_steps`` (``T``) is the total length, warm-up included, as in
    ``optax.warmup_cosine_decay_schedule`` (same values; Optax rejects
    ``W = T``, where this schedule jumps to ``end_value`` at ``W``). Note that
    ``init_value = 0`` gives a learning rate of 0 on the first update.
    """
    _check_values(init_value=init_value, peak_value=peak_value, end_value=end_value)
    warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
    decay_steps = _check_int("decay_steps", decay_steps, 0)
    if warmup_steps > decay_steps:
        raise ValueError(
            f"warmup_steps ({warmup_steps}) must not exceed decay_steps ({decay_steps}); "
            "decay_steps is the total length, warm-up included"
        )
    return join_schedules(
        [
            linear(init_value, peak_value, warmup_steps),
            cosine_decay(peak_value, decay_steps - warmup_steps, end_value),
        ],
        [warmup_steps],
    )


def warmup_linear_decay(
    peak_value: float,
    warmup_steps: int,
    total_steps: int,
    init_value: float = 0.0,
    end_value: float = 0.0,
) -> Schedule:
    """Linear warm-up ``init_value -> peak_value`` over ``warmup_steps``, then linear decay.

    .. math::
        v(t) = \\begin{cases}
            v_0 + (v_p - v_0)\\, t / W & t < W \\\\
            v_p + (v_1 - v_p)\\, (\\min(t, T) - W) / (T - W) & t \\ge W
        \\end{cases}

    The BERT recipe (Devlin et al., 2019); with the defaults it equals Hugging
    Face's ``get_linear_schedule_with_warmup`` (``peak * t / W``, then
    ``peak * (T - t) / (T - W)``, held at 0 after ``T``), including ``W = 0``
    and ``W = T``.
    """
    _check_values(init_value=init_value, peak_value=peak_value, end_value=end_value)
    warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
    total_steps = _check_int("total_steps", total_steps, 0)
    if warmup_steps > total_steps:
        raise ValueError(
            f"warmup_steps ({warmup_steps}) must not exceed total_steps ({total_steps})"
        )
    return join_schedules(
        [
            linear(init_value, peak_value, warmup_steps),
            linear(peak_value, end_value, total_steps - warmup_steps),
        ],
        [warmup_steps],
    )


def inverse_sqrt(peak_value: float, warmup_steps: int, init_value: float = 0.0) -> Schedule:
    """Linear warm-up ``init_value -> peak_value``, then decay as ``1 / sqrt(t)``.

    .. math::
        v(t) = \\begin{cases}
            v_0 + (v_p - v_0)\\, t / W & t < W \\\\
            v_p \\sqrt{W' / t} & t \\ge W
        \\end{cases}
        \\qquad W' = \\max(W, 1)

    fairseq's ``inverse_sqrt`` (``warmup_init_lr = init_value``). With
    ``warmup_steps = 0`` the value is ``peak_value / sqrt(max(t, 1))``: the peak
    on the first two updates, then the same decay. T5's
    ``1 / sqrt(max(t, k))`` is ``inverse_sqrt(k**-0.5, k, init_value=k**-0.5)``.
    """
    _check_values(init_value=init_value, peak_value=peak_value)
    warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
    warmup = linear(init_value, peak_value, warmup_steps)
    decay_from = max(warmup_steps, 1)

    def schedule(step: int | Array) -> Array:
        t = _steps(step)
        # The warm-up ramp is flat at the peak from W on, and the decay factor is 1 up to W.
        factor = jnp.sqrt(decay_from / _as_float(jnp.maximum(t, decay_from)))
        return warmup(t) * factor

    return schedule


# --------------------------------------------------------------------------- SGDR


def _restart_position(t: Array, T_0: int, T_mult: int) -> tuple[Array, Array]:
    """``(T_cur, T_i)``: the steps since the last restart and the current cycle's length.

    Cycle ``k`` has length ``T_0 * T_mult**k`` and starts at
    ``T_0 * (T_mult**k - 1) / (T_mult - 1)``. The cycle index is found by
    comparing integers against that table (no logarithms, so no off-by-one at
    a boundary); only the starts a step of ``t``'s dtype can reach are kept.
    """
    if T_mult == 1:
        return t % T_0, jnp.full(t.shape, T_0, _float_dtype())
    limit = int(jnp.iinfo(t.dtype).max)
    starts, length = [0], T_0
    while starts[-1] + length <= limit:
        starts.append(starts[-1] + length)
        length *= T_mult
    cycle = _count_reached(t, starts[1:])
    lengths = [T_0 * T_mult**k for k in range(len(starts))]
    start = jnp.asarray(starts, t.dtype)[cycle]
    return t - start, jnp.asarray(lengths, _float_dtype())[cycle]


def cosine_warm_restarts(
    init_value: float, T_0: int, T_mult: int = 1, eta_min: float = 0.0
) -> Schedule:
    """SGDR: cosine from ``init_value`` to ``eta_min``, restarted every cycle.

    .. math::
        v(t) = \\eta_{min} + \\tfrac12 (v_0 - \\eta_{min})
            \\left(1 + \\cos\\frac{\\pi T_{cur}(t)}{T_i(t)}\\right)

    with cycle ``i`` of length ``T_i = T_0 * T_mult**i`` and ``T_cur`` the steps
    since its start (Loshchilov & Hutter, 2017). torch:
    ``CosineAnnealingWarmRestarts(T_0, T_mult, eta_min)`` at every step, for as
    many cycles as the step's integer type reaches. Optax's ``sgdr_schedule``
    gives the same values for a finite list of cycles.
    """
    init_value = _check_value("init_value", init_value)
    T_0 = _check_int("T_0", T_0, 1)
    T_mult = _check_int("T_mult", T_mult, 1)
    eta_min = _check_value("eta_min", eta_min)

    def schedule(step: int | Array) -> Array:
        t_cur, t_i = _restart_position(_steps(step), T_0, T_mult)
        return _anneal_cos(init_value, eta_min, _as_float(t_cur) / t_i)

    return schedule


# --------------------------------------------------------------------------- one-cycle


def _one_cycle(
    knots: Sequence[float],
    total_steps: int,
    pct_start: float,
    anneal_strategy: AnnealStrategy,
    three_phase: bool,
) -> Schedule:
    """Piecewise anneal through ``knots`` with torch OneCycleLR's phase boundaries.

    Phase ``i`` runs from ``e[i-1]`` (``e[-1] = 0``) to ``e[i]``, with
    ``e = [pT - 1, T - 1]``, or ``[pT - 1, 2pT - 2, T - 1]`` for three phases,
    computed in double precision exactly as torch does. A step ``t`` belongs to
    the first phase with ``t <= e[i]``; within it the value goes from
    ``knots[i]`` to ``knots[i+1]`` as ``(t - e[i-1]) / (e[i] - e[i-1])`` goes
    from 0 to 1. From ``T - 1`` on the last knot is held.
    """
    total_steps = _check_int("total_steps", total_steps, 1)
    if isinstance(pct_start, jax.core.Tracer):
        raise TypeError("pct_start must be a number, not a traced value: it places the phases")
    if not 0.0 < _check_value("pct_start", pct_start) < 1.0:
        raise ValueError(f"pct_start must be in (0, 1), got {pct_start}")
    anneal = _check_anneal("anneal_strategy", anneal_strategy)

    warmup_end = float(pct_start * total_steps) - 1
    if three_phase:
        ends = [warmup_end, float(2 * pct_start * total_steps) - 2, float(total_steps - 1)]
    else:
        ends = [warmup_end, float(total_steps - 1)]
    starts = [0.0, *ends[:-1]]
    if not warmup_end > 0:
        raise ValueError(
            "pct_start * total_steps must exceed 1 so that the warm-up phase has a positive "
            f"length, got pct_start={pct_start}, total_steps={total_steps}"
        )
    if not ends[-1] > starts[-1]:
        raise ValueError(
            "with three_phase=True the last phase must have a positive length, i.e. "
            f"total_steps * (1 - 2 * pct_start) > -1; got pct_start={pct_start}, "
            f"total_steps={total_steps}"
        )
    spans = [end - start for start, end in zip(starts, ends, strict=True)]
    # Integer step t is past the float end e of a phase iff t >= floor(e) + 1.
    phase_thresholds = [math.floor(end) + 1 for end in ends[:-1]]

    def schedule(step: int | Array) -> Array:
        t = _steps(step)
        phase = _count_reached(t, phase_thresholds)
        dtype = _float_dtype()

        def table(values: Sequence[float]) -> Array:
            return jnp.asarray(values, dtype)[phase]

        frac = (_as_float(t) - table(starts)) / table(spans)
        frac = jnp.minimum(frac, 1.0)
        return anneal(table(knots[:-1]), table(knots[1:]), frac)

    return schedule


def one_cycle(
    max_value: float,
    total_steps: int,
    pct_start: float = 0.3,
    anneal_strategy: AnnealStrategy = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
) -> Schedule:
    """The one-cycle learning rate (Smith & Topin, 2018) with torch ``OneCycleLR`` semantics.

    With ``v_init = max_value / div_factor`` and
    ``v_min = v_init / final_div_factor``, the value anneals (cosine or linear)

    * two phases: ``v_init -> max_value`` until step ``pct_start*T - 1``, then
      ``-> v_min`` at step ``T - 1``;
    * three phases: ``v_init -> max_value`` until ``pct_start*T - 1``,
      ``-> v_init`` at ``2*pct_start*T - 2``, then ``-> v_min`` at ``T - 1``.

    The same value as ``OneCycleLR(max_lr=max_value, total_steps=T, ...)`` at
    every step ``0 <= t <= T - 1``, phase boundaries included. torch raises
    past ``T`` (and at ``t = T``, a step no update uses, extrapolates); this
    schedule holds ``v_min`` from ``T - 1`` on. Optax's
    ``cosine_onecycle_schedule`` puts the peak at ``floor(pct_start*T)`` and the
    minimum at ``T``, one step later than torch. ``pct_start`` is in (0, 1) with
    ``pct_start*T > 1``; with three phases also ``T*(1 - 2*pct_start) > -1``.
    Pair with :func:`one_cycle_momentum` for torch's ``cycle_momentum``.
    """
    max_value = _check_value("max_value", max_value)
    div_factor = _check_value("div_factor", div_factor, positive=True)
    final_div_factor = _check_value("final_div_factor", final_div_factor, positive=True)
    initial = max_value / div_factor
    minimum = initial / final_div_factor
    knots = [initial, max_value, initial, minimum] if three_phase else [initial, max_value, minimum]
    return _one_cycle(knots, total_steps, pct_start, anneal_strategy, three_phase)


def one_cycle_momentum(
    total_steps: int,
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
    pct_start: float = 0.3,
    anneal_strategy: AnnealStrategy = "cos",
    three_phase: bool = False,
) -> Schedule:
    """The momentum that torch ``OneCycleLR(cycle_momentum=True)`` sets, inverse to the lr.

    On the phases of :func:`one_cycle` with the same ``total_steps``,
    ``pct_start``, ``anneal_strategy`` and ``three_phase``: ``max_momentum ->
    base_momentum`` while the lr rises, ``-> max_momentum`` while it falls, and
    (three phases) held at ``max_momentum`` in the last phase. This is torch's
    ``param_group['momentum']`` for SGD and ``betas[0]`` for Adam; pass it as
    ``sgd(momentum=...)`` or Adam's ``b1``.
    """
    validation.check_beta("base_momentum", base_momentum)
    validation.check_beta("max_momentum", max_momentum)
    low, high = float(base_momentum), float(max_momentum)
    knots = [high, low, high, high] if three_phase else [high, low, high]
    return _one_cycle(knots, total_steps, pct_start, anneal_strategy, three_phase)
