"""Checks of the arguments callers pass: a wrong type or value is a `UsageError` naming it.

The message names the argument as an `Option`, so Python callers read `timeout=` and the command
line `--timeout`.

Example:
    >>> check_timeout(30)
    30.0
    >>> check_timeout("abc")
    Traceback (most recent call last):
    isolhub.UsageError: timeout= must be a positive number of seconds or None, not 'abc'
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from ._errors import Option, UsageError

__all__ = ["check_choice", "check_count", "check_timeout", "check_tolerance"]


def check_timeout(value: Any, name: str = "timeout") -> float | None:
    """`value` as seconds (a positive, finite number) or None.

    Raises:
        UsageError: anything else (a string, a bool, 0, a negative number, NaN, infinity).
    """
    if value is None:
        return None
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise UsageError(
            (Option.of(name), f" must be a positive number of seconds or None, not {value!r}")
        )
    return float(value)


def check_tolerance(value: Any, name: str) -> float:
    """`value` as a tolerance: a finite number >= 0.

    Raises:
        UsageError: anything else.
    """
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < 0:
        raise UsageError((Option.of(name), f" must be a number >= 0, not {value!r}"))
    return float(value)


def check_count(value: Any, name: str, *, minimum: int = 1, none: bool = True) -> int | None:
    """`value` as an int of at least `minimum` (or None, where `none`).

    Raises:
        UsageError: not an int (bools and floats included), or below `minimum`.
    """
    if value is None and none:
        return None
    if type(value) is not int or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise UsageError(
            (Option.of(name), f" must be {what}{' or None' if none else ''}, not {value!r}")
        )
    return value


def check_choice(value: Any, name: str, choices: Collection[str]) -> str:
    """`value`, one of `choices`.

    Raises:
        UsageError: another value; the message lists the choices.
    """
    if not isinstance(value, str) or value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise UsageError((f"unknown {name} {value!r}: ", Option.of(name), f" takes {listed}"))
    return value
