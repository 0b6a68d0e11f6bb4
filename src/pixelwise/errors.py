"""The one exception type for user mistakes.

`UserError` subclasses `ValueError`, so library callers can catch the usual type; the CLI
shows it (and `OSError`s about files) as a single line with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import numbers


class UserError(ValueError):
    """Bad input from the user: an unknown name, a malformed file, an impossible size."""


def unknown_name(kind: str, name: object, valid: "list[str] | tuple[str, ...] | dict") -> UserError:
    """The standard error for a name that is not in a dict of names: lists the valid ones."""
    names = ", ".join(sorted(valid))
    return UserError(f"unknown {kind} {name!r}; valid names: {names}")


def check_positive_int(name: str, value: object, *, numpy_ok: bool = False) -> int:
    """`value` when it is a positive int (never a bool), else the standard UserError naming it
    ("NAME must be a positive integer, got VALUE"). Only Python ints by default: model options
    end up in JSON configs, which numpy integers would break; `numpy_ok` also takes any
    integral number (numpy's) and returns it as an int."""
    kind = numbers.Integral if numpy_ok else int
    if isinstance(value, bool) or not isinstance(value, kind) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
