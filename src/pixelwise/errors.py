"""The one exception type for user mistakes.

`UserError` subclasses `ValueError`, so library callers can catch the usual type; the CLI
shows it (and `OSError`s about files) as a single line with a non-zero exit, never a traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user: an unknown name, a malformed file, an impossible size."""


def unknown_name(kind: str, name: object, valid: "list[str] | tuple[str, ...] | dict") -> UserError:
    """The standard error for a name that is not in a dict of names: lists the valid ones."""
    names = ", ".join(sorted(valid))
    return UserError(f"unknown {kind} {name!r}; valid names: {names}")
