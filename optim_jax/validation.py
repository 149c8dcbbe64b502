"""Argument checks that fail at construction time with a message naming the argument.

Schedules (callables) are not evaluated here: their values are only known under
``jit``. Every check accepts Python numbers and concrete arrays, and a traced
scalar passes unchecked: ``optax.inject_hyperparams`` calls an optimizer factory
inside the jitted update with every numeric hyperparameter as a traced scalar
(its value was checked when it was a number, at construction).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


def _is_number(value: Any) -> bool:
    # float() reads "1e-3" and True too: a string or a flag here is a mistake, not a number.
    is_flag = isinstance(value, bool) or getattr(value, "dtype", None) == np.bool_
    if callable(value) or isinstance(value, str | bytes) or is_flag:
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _is_traced_scalar(name: str, value: Any) -> bool:
    """True for a traced real scalar; raises naming ``name`` for another traced value."""
    if not isinstance(value, jax.core.Tracer):
        return False
    if value.shape != () or not np.issubdtype(value.dtype, np.number):
        raise TypeError(f"{name} must be a real scalar, got a traced {value.aval}")
    return True


def _as_float(name: str, value: Any) -> float | None:
    """``float(value)``, or None for a schedule or a traced scalar; raises for anything else."""
    if callable(value) or _is_traced_scalar(name, value):
        return None
    if not _is_number(value):
        raise TypeError(f"{name} must be a number or a schedule, got {value!r}")
    number = float(value)
    if math.isnan(number):
        raise ValueError(f"{name} must not be NaN")
    return number


def check_non_negative(name: str, value: Any) -> None:
    number = _as_float(name, value)
    if number is not None and number < 0:
        raise ValueError(f"{name} must be >= 0, got {number}")


def check_positive(name: str, value: Any) -> None:
    number = _as_float(name, value)
    if number is not None and not number > 0:
        raise ValueError(f"{name} must be > 0, got {number}")


def check_beta(name: str, value: Any) -> None:
    """A decay rate: 0 <= value < 1."""
    number = _as_float(name, value)
    if number is not None and not 0.0 <= number < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {number}")


def check_in_range(name: str, value: Any, low: float, high: float) -> None:
    """low <= value <= high."""
    number = _as_float(name, value)
    if number is not None and not low <= number <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {number}")


def check_positive_int(name: str, value: Any, *, array_ok: bool = False) -> None:
    """A Python int >= 1; with ``array_ok`` also an integer scalar array (traced: unchecked)."""
    _check_int(name, value, 1, "a positive integer", array_ok)


def check_non_negative_int(name: str, value: Any) -> None:
    """A Python int >= 0."""
    _check_int(name, value, 0, "a non-negative integer", False)


def _check_int(name: str, value: Any, low: int, what: str, array_ok: bool) -> None:
    if isinstance(value, jax.Array | np.ndarray):
        if not array_ok:
            # Such an integer decides the program's structure (shapes, loops), which an
            # array's value cannot: optax.inject_hyperparams turns every int into one
            # unless told not to.
            raise ValueError(
                f"{name} must be a Python int, got {value!r}: it fixes the program's "
                f"structure (shapes, loop counts), so with optax.inject_hyperparams name it "
                f"in static_args"
            )
        valid = (
            np.issubdtype(value.dtype, np.integer)
            and value.shape == ()
            and (isinstance(value, jax.core.Tracer) or int(value) >= low)
        )
    else:
        valid = not isinstance(value, bool) and isinstance(value, int) and value >= low
    if not valid:
        raise ValueError(f"{name} must be {what}, got {value!r}")
