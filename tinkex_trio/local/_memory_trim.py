"""Give freed heap memory back to the operating system after a large release.

When a session's adapters and optimizer state are dropped, the C allocator (glibc malloc)
keeps the freed pages in its arenas for reuse, so the server's resident size stays at its
high-water mark although nothing uses the memory. `malloc_trim(0)` returns free pages at the
top of every arena and madvises free pages inside them. It costs a few milliseconds and is
called only after a release (`Backend.release_session`), never on a hot path. On a C library
without it (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

__all__ = ["trim_heap"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def trim_heap() -> bool:
    """Return free heap pages to the OS; False if the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
