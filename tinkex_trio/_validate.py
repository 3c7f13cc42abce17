"""Argument checks shared by the clients: bad input fails before anything is sent."""

from __future__ import annotations

from tinkex_trio import types as t
from tinkex_trio.errors import InvalidInputError


def require_str(name: str, value: object) -> None:
    """`value` must be a non-empty string; the error names the argument `name`."""
    if not isinstance(value, str) or not value:
        raise InvalidInputError(f"{name} must be a non-empty string, got {value!r}")


def require_tinker_path(name: str, value: str) -> t.ParsedTinkerPath:
    """`value` must be a `tinker://<run>/<segment>/<name>` path; returns it parsed.

    (`ParsedTinkerPath.parse` also refuses a non-string, with the same message.)
    """
    try:
        return t.ParsedTinkerPath.parse(value)
    except ValueError as exc:
        raise InvalidInputError(f"{name}: {exc}") from None
