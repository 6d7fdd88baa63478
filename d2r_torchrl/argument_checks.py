"""Checks of the public builders' arguments: each raises ``ValueError`` with one line naming
the argument, the value given and what is accepted."""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

# NumPy seeds and Meta-World's env seeds must lie in [0, 2**32).
SEED_LIMIT = 2**32


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
    return int(value)


def widths(name: str, value: Sequence[Any]) -> tuple[int, ...]:
    """A non-empty sequence of positive integers."""
    items = tuple(value) if isinstance(value, (list, tuple)) else ()
    if not items or any(isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1 for w in items):
        raise ValueError(f"{name} must be a non-empty sequence of positive integers, got {value!r}.")
    return tuple(int(w) for w in items)


def finite(
    name: str, value: Any, *, positive: bool = False, minimum: float | None = None, optional: bool = False
) -> float | None:
    """A finite real number (``positive``: > 0; ``minimum``: >= it); ``optional``: None is accepted too."""
    if value is None and optional:
        return None
    accepted = "a finite positive number" if positive else "a finite number"
    accepted += (f" >= {minimum:g}" if minimum is not None else "") + (" or None" if optional else "")
    is_number = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    if not (is_number and math.isfinite(value)) or (positive and value <= 0) or (
        minimum is not None and value < minimum
    ):
        raise ValueError(f"{name} must be {accepted}, got {value!r}.")
    return float(value)


def seed(name: str, value: Any, span: int = 1) -> int:
    """A seed ``s`` such that the ``span`` seeds ``s, ..., s + span - 1`` are valid NumPy seeds."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= SEED_LIMIT - span:
        raise ValueError(f"{name} must be an integer in [0, {SEED_LIMIT - span}], got {value!r}.")
    return int(value)
