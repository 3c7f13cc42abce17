"""argparse argument types shared by the `tinkex-trio` command line and `tinkex-trio serve`.

Both `cli.py` and `local/server.py` import this module, and it imports neither, so the command
line and the local backend do not import each other (`cli.py` loads the server lazily, only
for `serve`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Final


def int_at_least(minimum: int, expected: str) -> Callable[[str], int]:
    """An argparse type: an int >= `minimum`; the error says what was `expected`."""

    def parse(value: str) -> int:
        try:
            number: int | None = int(value)
        except ValueError:
            number = None
        if number is None or number < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
        return number

    return parse


positive_int = int_at_least(1, "a positive integer")
"""argparse type: an int >= 1."""
non_negative_int = int_at_least(0, "an integer >= 0")
"""argparse type: an int >= 0."""


_SIZE_SUFFIXES: Final = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def byte_size(value: str) -> int:
    """An argparse type: a positive byte count, optionally with K, M, G or T (powers of 1024)."""
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (text[:-1], text[-1]) if text[-1:] in _SIZE_SUFFIXES else (text, "")
    try:
        size = int(float(number) * _SIZE_SUFFIXES[unit])
    except (ValueError, OverflowError):
        size = 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"expected a size such as 500M or 64G, got {value!r}")
    return size
