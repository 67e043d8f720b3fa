"""Argument checks shared across modules: one message format for every option."""

from __future__ import annotations

import math
from typing import Any


def finite_number(value: Any, name: str, strictly_positive: bool = True) -> float:
    """`value` as a float, or a one-line `ValueError` naming `name` unless it is
    finite and > 0 (`strictly_positive`) or ≥ 0."""
    bound = "> 0" if strictly_positive else "≥ 0"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a finite number {bound}; got {value!r}.") from None
    if not math.isfinite(number) or number < 0 or (strictly_positive and number == 0):
        raise ValueError(f"{name} must be a finite number {bound}; got {value!r}.")
    return number
