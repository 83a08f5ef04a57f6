"""Argument checks shared by every layer: a value out of its domain is a ParameterError naming the
argument and the value, found before any work is done (a bool is never a number here: True is 1
to Python, never a batch size or a window)."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from nearstore.errors import ParameterError


def check_range(
    name: str,
    value: Any,
    low: float,
    high: float = math.inf,
    *,
    integer: bool = False,
    open_low: bool = False,
    open_high: bool = False,
) -> None:
    """`name` is a number (an integer where `integer`; never a bool, never NaN) from low to high,
    each end closed unless said open."""
    number = is_integer(value) if integer else isinstance(value, numbers.Real) and not isinstance(value, bool)
    inside = number and (low < value if open_low else low <= value) and (value < high if open_high else value <= high)
    if not inside:
        kind = "an integer" if integer else "a finite number" if high == math.inf and open_high else "a number"
        if high == math.inf:
            where = f"{'>' if open_low else '>='} {low}"
        else:
            where = f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ParameterError(f"{name} must be {kind} {where}, got {value!r}")


def is_integer(value: Any) -> bool:
    """An int, numpy's too; not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_integer(name: str, value: Any, minimum: int) -> int:
    """`name` as an int >= minimum (numpy's integers too)."""
    check_range(name, value, minimum, integer=True)
    return int(value)


def check_flag(name: str, value: Any) -> bool:
    """`name` as a bool: a string such as "no" would be true, so only a bool is one."""
    if not isinstance(value, (bool, np.bool_)):
        raise ParameterError(f"{name} must be True or False, got {value!r}")
    return bool(value)
