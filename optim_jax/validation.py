"""Argument checks that fail at construction time with a message naming the argument.

Schedules (callables) are not evaluated here: their values are only known under
``jit``. Every check accepts Python numbers and concrete arrays.
"""

from __future__ import annotations

import math
from typing import Any


def _is_number(value: Any) -> bool:
    if callable(value):
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _as_float(name: str, value: Any) -> float | None:
    """``float(value)``, or None for a schedule; raises for anything else."""
    if callable(value):
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


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
