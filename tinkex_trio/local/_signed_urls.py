"""Signed, expiring URLs on this server: checkpoint archives (PROTOCOL.md A.4), external-weights
files (3.5, 9.10) and trace exports, all fetched without the API key.

A URL is `<base><path>?expires=<unix>&signature=<hex>` with signature =
HMAC-SHA256(server secret, "<path>\\n<expires>"). The secret lives in `<data_dir>/secret`, so
URLs issued before a restart stay valid. A tampered URL is answered 403, an expired one 410.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Final

from ._http import HTTPError, Request

#: Lifetime of every signed URL. The SDK defaults to 15 minutes when no Expires header parses
#: (A.4.2) and re-signs external-weights URLs within 5 minutes of `expires` (9.10); an hour
#: leaves time for a slow download to start.
SIGNED_URL_TTL: Final = 3600.0


def sign(secret: bytes, path: str, expires: int) -> str:
    return hmac.new(secret, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()


def verify(secret: bytes, path: str, expires: int, signature: str) -> bool:
    return hmac.compare_digest(sign(secret, path, expires), signature)


class SignedUrls:
    """Makes and checks the signed URLs of one server (one secret)."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def expiry(self) -> int:
        """The `expires` (unix time) of a URL signed now."""
        return int(time.time() + SIGNED_URL_TTL)

    def make(self, base_url: str, path: str, expires: int) -> str:
        """`path` on this server, usable without the API key until `expires` (unix time)."""
        return f"{base_url}{path}?expires={expires}&signature={sign(self._secret, path, expires)}"

    def check(self, request: Request, path: str, *, what: str, renew: str) -> None:
        """Refuse a tampered (403) or stale (410) signed URL; `renew` says how to get a new one."""
        try:
            expires = int(request.query.get("expires", ""))
        except ValueError:
            raise HTTPError(403, f"{what} URL has no valid expires parameter") from None
        if not verify(self._secret, path, expires, request.query.get("signature", "")):
            raise HTTPError(403, f"{what} URL signature does not match")
        if expires < time.time():
            raise HTTPError(410, f"{what} URL has expired; {renew}")
