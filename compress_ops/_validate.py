"""The argument checks every layer shares: one message format, one place.

A leaf module (it imports nothing of the project), so kernels, formats, configs, modules and
the API all use it. Each check raises ``TypeError`` for a value of the wrong kind where the
kind is the whole contract (a bool flag), else ``ValueError`` naming the argument, what it must
be and what it got: ``rank must be an int >= 1, got 0``. ``bool`` is never accepted as a number.
"""

from __future__ import annotations

from collections.abc import Collection

__all__ = ["is_int", "is_number", "check_bool", "check_int", "check_number", "check_choice"]


def is_int(v: object) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: object) -> bool:
    """An ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_bool(name: str, v: object) -> None:
    """``TypeError`` unless ``v`` is a bool."""
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")


def check_int(name: str, v: object, *, min: int | None = None) -> int:  # noqa: A002
    """``ValueError`` unless ``v`` is an int (not a bool) ``>= min``; returns it."""
    if not is_int(v) or (min is not None and v < min):
        bound = "" if min is None else f" >= {min}"
        raise ValueError(f"{name} must be an int{bound}, got {v!r}")
    return v


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def check_number(name: str, v: object, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, hint: str = "") -> float:
    """``ValueError`` unless ``v`` is an int or float (not a bool) in the interval given by
    ``low`` / ``high`` (closed unless ``*_open``); returns ``float(v)``. ``hint`` is appended
    to the message (what the number means)."""
    ok = is_number(v)
    if ok:
        x = float(v)
        ok = not (x != x)  # NaN is in no interval
        if low is not None:
            ok = ok and (x > low if low_open else x >= low)
        if high is not None:
            ok = ok and (x < high if high_open else x <= high)
    if not ok:
        where = _interval(low, high, low_open, high_open)
        raise ValueError(f"{name} must be a number{' ' + where if where else ''}"
                         f"{' ' + hint if hint else ''}, got {v!r}")
    return float(v)


def check_choice(name: str, v: object, choices: Collection[object], *, hint: str = "") -> None:
    """``ValueError`` unless ``v`` is one of ``choices``; where the choices are ints, ``v`` must
    be an int too (neither ``4.0`` nor ``True`` stands for one). ``hint`` follows the choices
    in the message (another accepted form)."""
    if (all(is_int(c) for c in choices) and not is_int(v)) or v not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}{' ' + hint if hint else ''}, "
                         f"got {v!r}")
