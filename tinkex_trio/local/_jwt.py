"""JWT-exchange auth for the local backend (PROTOCOL.md 1.3, 3.1 `auth/token`).

With ``jwt_auth=True`` the backend says ``pjwt_auth_enabled: true`` in ``client/config``,
``POST /api/v1/auth/token`` exchanges the API key for a short-lived JWT, and every endpoint
accepts either the raw key or a valid, unexpired JWT. An expired or forged JWT is answered
``401`` with ``WWW-Authenticate: Bearer error="invalid_token"``, which tells a client to
exchange again and replay (1.3). Keeping the raw key valid too lets clients that never learned
the mode (a `curl`, the config fetch, which always carries the raw key) keep working.

Tokens are HS256 (HMAC-SHA256) over ``header.payload`` with a key derived from the backend's
secret (``<data_dir>/secret``), so they survive a restart until they expire, and are distinct
from the archive-URL signatures made with the same secret. Claims: ``sub`` and ``org_id`` (for
``whoami``, 3.7), ``iat``, ``exp``, ``iss``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any, Final

__all__ = ["DEFAULT_JWT_LIFETIME", "JwtIssuer"]

DEFAULT_JWT_LIFETIME: Final = 3600.0
"""Seconds a local JWT is valid. An hour: clients refresh at about half of it (1.3)."""

ISSUER: Final = "tinkex-trio-local"
SUBJECT: Final = "local-user"
ORG_ID: Final = "local"

_HEADER: Final = {"alg": "HS256", "typ": "JWT"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class JwtIssuer:
    """Issues and checks the backend's JWTs.

    Args:
        secret: the backend's HMAC secret; the signing key is derived from it.
        lifetime: seconds from ``iat`` to ``exp``.
        clock: wall-clock seconds (``time.time``); tests move it to expire tokens.
    """

    def __init__(
        self,
        secret: bytes,
        *,
        lifetime: float = DEFAULT_JWT_LIFETIME,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not lifetime > 0:
            raise ValueError(f"jwt_lifetime must be a positive number of seconds, got {lifetime!r}")
        self._key = hmac.new(secret, b"tinkex-trio local JWT v1", hashlib.sha256).digest()
        self.lifetime = float(lifetime)
        self.clock = clock

    def _sign(self, signing_input: str) -> str:
        return _b64(hmac.new(self._key, signing_input.encode(), hashlib.sha256).digest())

    def issue(self) -> str:
        """A new token valid for `lifetime` seconds from now."""
        iat = self.clock()
        claims = {
            "iss": ISSUER,
            "sub": SUBJECT,
            "org_id": ORG_ID,
            "iat": round(iat, 3),
            "exp": round(iat + self.lifetime, 3),
        }
        head = _b64(json.dumps(_HEADER, separators=(",", ":")).encode())
        body = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{head}.{body}"
        return f"{signing_input}.{self._sign(signing_input)}"

    def verify(self, token: str) -> dict[str, Any] | None:
        """The claims of ``token`` if it is ours and unexpired, else None."""
        parts = token.split(".")
        if len(parts) != 3:
            return None
        head, body, signature = parts
        if not hmac.compare_digest(signature.encode(), self._sign(f"{head}.{body}").encode()):
            return None
        try:
            claims = json.loads(_unb64(body))
        except (binascii.Error, ValueError):
            return None
        if not isinstance(claims, dict):
            return None
        exp = claims.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, int | float) or exp <= self.clock():
            return None
        return {str(k): v for k, v in claims.items()}
