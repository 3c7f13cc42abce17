"""The common HTTP/1.1 response head, parsed without h11's event machinery.

Why: at thousands of concurrent `sample` calls, h11's per-header validation and its state
machine were a fifth of the client's CPU (issue 12's profile). Almost every answer of a Tinker
server is the same shape: ``HTTP/1.1``, a status from 200 up, a few headers, one
``Content-Length``. :func:`parse_response_head` reads that shape with a handful of
``bytes`` methods (C loops, no regular expressions) and returns None for anything else, so the
pool hands the connection to h11 for the unusual cases, where h11's correctness matters:
chunked bodies, bodies delimited by the connection closing, ``HTTP/1.0``, 1xx / 204 / 304,
obsolete line folding, duplicate or malformed ``Content-Length``, bare ``LF`` line ends.

What is still checked here, as h11 checks it: the status line's form, header names are tokens
(RFC 9110 5.6.2), values hold no control character but HTAB, and ``Connection: close`` is
honoured. A head that breaks those rules also goes to h11, which raises its own
``RemoteProtocolError`` with the reason.
"""

from __future__ import annotations

from typing import Final, NamedTuple

__all__ = ["ResponseHead", "parse_response_head"]

_TOKEN_CHARS: Final = (
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
_VALUE_CHARS: Final = b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100))
_NO_BODY_STATUSES: Final = frozenset({204, 304})


class ResponseHead(NamedTuple):
    """A parsed response head of the common shape."""

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    """As received: names in their case, values without surrounding whitespace."""
    content_length: int
    keep_alive: bool
    """False when the server sent ``Connection: close``."""


def parse_response_head(head: bytes) -> ResponseHead | None:
    """Parse ``head`` (the bytes before the blank line, without it); None if it is not the
    common shape (see the module docstring), so the caller lets h11 read the response."""
    lines = head.split(b"\r\n")
    status_line = lines[0]
    # "HTTP/1.1 200 OK": the version, a 3-digit code, and an optional reason after a space.
    if status_line[:9] != b"HTTP/1.1 " or len(status_line) < 12:
        return None
    code = status_line[9:12]
    if not code.isdigit() or (len(status_line) > 12 and status_line[12:13] != b" "):
        return None
    status = int(code)
    if status < 200 or status in _NO_BODY_STATUSES:
        return None
    reason = status_line[13:]
    if reason.translate(None, _VALUE_CHARS):
        return None
    headers: list[tuple[bytes, bytes]] = []
    length: int | None = None
    keep_alive = True
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        # No colon, an empty name, whitespace in or around it (obs-fold lines start with it),
        # or a character outside the token set: h11 decides.
        if not colon or not name or name.translate(None, _TOKEN_CHARS):
            return None
        value = value.strip(b" \t")
        if value.translate(None, _VALUE_CHARS):
            return None
        lowered = name.lower()
        if lowered == b"content-length":
            if length is not None or not value.isdigit():
                return None
            length = int(value)
        elif lowered == b"transfer-encoding":
            return None
        elif lowered == b"connection" and b"close" in value.lower():
            keep_alive = False
        headers.append((name, value))
    if length is None:
        return None
    return ResponseHead(status, reason, headers, length, keep_alive)
