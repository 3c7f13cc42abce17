"""The ``X-API-Key`` value at send time: the raw credential, or an exchanged JWT (PROTOCOL.md 1.3).

Synopsis::

    auth = Credentials(config, exchange)     # exchange(raw) -> body of POST /api/v1/auth/token
    key = await auth.header_value()          # the Transport asks before every send
    auth.enable_jwt("api_key")               # client/config said pjwt_auth_enabled: true
    nursery.start_soon(auth.refresh_forever)

Why a provider the Transport asks, rather than a default header: in JWT-exchange mode the
value changes while the service runs (refreshes), and the first request that needs a token
has to wait for the exchange. Keeping this in one object also keeps the secrets in one place:
:class:`Credentials` never logs, shows or raises the credential or the JWT (its ``repr`` says
only the mode and how long the token has left).

Modes:

* **API-key mode** (the default, and before ``client/config`` has answered): the raw
  credential, i.e. ``Config.api_key``, or the output of ``Config.credential_cmd`` when no key is
  set (PROTOCOL.md 1.1 resolution order; 1.3: "the very first request always carries the raw
  credential").
* **JWT-exchange mode** (:meth:`enable_jwt`): the first request that needs a token exchanges the
  raw credential for a JWT (single flight: concurrent senders wait for the same exchange). Its
  payload is decoded *without* verification, only for ``exp``/``iat`` (refresh scheduling) and
  :meth:`claims` (``whoami``, 3.7). A background task (:meth:`refresh_forever`, in the service
  nursery) refreshes after ``(exp - iat) * U(0.45, 0.55)`` s, retrying every 60 s on failure;
  a sender also refreshes on demand when the token has 60 s or less left. A ``401`` with
  ``WWW-Authenticate: ... error="invalid_token"`` makes the Transport call :meth:`refresh` with
  the rejected token and replay the request once.

Expiry is kept on trio's clock: at receipt, ``expires_at = now + min(exp - time.time(), exp -
iat)``, so a server clock that runs ahead cannot make us hold a token past its lifetime, and
virtual-time tests see the schedule exactly.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import random as _random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, final

import msgspec
import trio

from tinkex_trio.config import Config
from tinkex_trio.errors import APIError

__all__ = ["Credentials"]

_logger: Final = logging.getLogger("tinkex_trio.auth")

TOKEN_PATH: Final = "/api/v1/auth/token"
"""The JWT exchange endpoint (PROTOCOL.md 3.1): body ``{}``, raw credential in ``X-API-Key``."""

REFRESH_FRACTION_LOW: Final = 0.45
REFRESH_FRACTION_HIGH: Final = 0.55
"""Background refresh after ``(exp - iat) * U(0.45, 0.55)`` s (PROTOCOL.md 1.3)."""

REFRESH_RETRY_DELAY: Final = 60.0
"""A failed background refresh is retried after this long (PROTOCOL.md 1.3)."""

MIN_REMAINING: Final = 60.0
"""A sender refreshes on demand when the cached JWT has this long or less left (1.3)."""

JWT_PREFIX: Final = "eyJ"
"""A credential starting so is already a JWT (PROTOCOL.md 1.1)."""


class _TokenResponse(msgspec.Struct):
    jwt: str


_token_decoder: Final = msgspec.json.Decoder(_TokenResponse)


@dataclass(eq=False)
class _Token:
    value: str
    claims: Mapping[str, Any]
    expires_at: float  # trio clock
    refresh_at: float  # trio clock


def _jwt_claims(token: str) -> dict[str, Any]:
    """The payload of ``token``, unverified (PROTOCOL.md 1.3). ValueError if it is not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("not a JWT (expected three dot-separated parts)")
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        raise ValueError("the JWT payload is not base64url-encoded JSON") from None
    if not isinstance(claims, dict):
        raise ValueError("the JWT payload is not a JSON object")
    return claims


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


@final
class Credentials:
    """Decides the ``X-API-Key`` value of each request (module docstring).

    Args:
        config: ``api_key`` and ``credential_cmd`` are read from it.
        exchange: sends ``POST /api/v1/auth/token`` with the given raw credential and returns
            the response body (the Transport's; its errors propagate unchanged).
        rng: the source of the refresh jitter (inject a fixed one in tests).
    """

    random: _random.Random
    """The jitter source for the refresh schedule; replace it for deterministic schedules."""

    def __init__(
        self,
        config: Config,
        exchange: Callable[[str], Awaitable[bytes]],
        *,
        rng: _random.Random | None = None,
    ) -> None:
        self._api_key = config.api_key
        self._credential_cmd = config.credential_cmd
        self._exchange = exchange
        self.random = rng if rng is not None else _random.Random()
        self._jwt_mode = False
        self._use_cmd_for_exchange = False
        self._token: _Token | None = None
        self._lock = trio.Lock()
        self._new_token = trio.Event()

    # -- state -------------------------------------------------------------------------------

    @property
    def jwt_enabled(self) -> bool:
        return self._jwt_mode

    def enable_jwt(self, credential_default_source: str = "api_key") -> None:
        """Switch to JWT-exchange mode (``client/config`` said ``pjwt_auth_enabled: true``).

        ``credential_default_source == "credential_cmd"`` makes the exchange use the credential
        command's output, unless the API key is already a JWT (PROTOCOL.md 1.3).
        """
        self._jwt_mode = True
        self._use_cmd_for_exchange = (
            credential_default_source == "credential_cmd"
            and self._credential_cmd is not None
            and not (self._api_key or "").startswith(JWT_PREFIX)
        )

    def claims(self) -> Mapping[str, Any] | None:
        """The claims of the cached JWT (unverified), or None before the first exchange."""
        return None if self._token is None else dict(self._token.claims)

    async def current_claims(self) -> Mapping[str, Any] | None:
        """The claims (unverified) of the credential in use, for ``whoami`` (PROTOCOL.md 3.7).

        In JWT-exchange mode, those of the exchanged JWT (exchanging first if none is cached);
        in API-key mode, those of the API key when it is itself a JWT; otherwise None.

        Raises:
            APIError (or a subclass): the exchange failed.
        """
        if self._jwt_mode:
            await self.header_value()
            return self.claims()
        try:
            return _jwt_claims(self._api_key or "")
        except ValueError:
            return None

    def __repr__(self) -> str:
        if not self._jwt_mode:
            return "<Credentials mode=api_key>"
        if self._token is None:
            return "<Credentials mode=jwt no token yet>"
        left = self._token.expires_at - trio.current_time()
        return f"<Credentials mode=jwt token expires in {left:.0f} s>"

    # -- values --------------------------------------------------------------------------------

    async def raw_credential(self) -> str | None:
        """The credential itself: the key, or the credential command's stripped output.

        Raises:
            APIError: the credential command failed or printed nothing (its output is not shown).
        """
        if self._credential_cmd is not None and (self._use_cmd_for_exchange or not self._api_key):
            return await self._run_credential_cmd(self._credential_cmd)
        return self._api_key

    async def header_value(self) -> str | None:
        """What to send as ``X-API-Key`` now; may wait for an exchange in JWT mode.

        Raises:
            APIError (or a subclass): the exchange failed.
        """
        if not self._jwt_mode:
            if self._api_key is None and self._credential_cmd is not None:
                return await self.raw_credential()
            return self._api_key
        token = self._token
        if token is None or token.expires_at - trio.current_time() <= MIN_REMAINING:
            token = await self.refresh(stale=None if token is None else token.value)
        return token.value

    async def refresh(self, *, stale: str | None) -> _Token:
        """Exchange for a new JWT, unless another task already replaced ``stale``.

        Single flight: concurrent callers that saw the same old token wait for one exchange.
        ``stale`` is the token the caller found wanting (None: it found none).
        """
        async with self._lock:
            token = self._token
            if (
                token is not None
                and token.value != stale
                and token.expires_at - trio.current_time() > MIN_REMAINING
            ):
                return token
            return await self._exchange_now()

    async def _exchange_now(self) -> _Token:
        credential = await self.raw_credential()
        if credential is None:
            raise APIError(
                "JWT exchange needs a credential: set TINKER_API_KEY (or api_key=) or "
                "TINKER_CREDENTIAL_CMD"
            )
        body = await self._exchange(credential)
        try:
            value = _token_decoder.decode(body).jwt
            claims = _jwt_claims(value)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            # The message names what is wrong, never the token itself.
            raise APIError(f"invalid response from {TOKEN_PATH}: {type(exc).__name__}") from None
        now = trio.current_time()
        exp, iat = _number(claims, "exp"), _number(claims, "iat")
        if exp is None:
            lifetime = math.inf
        else:
            lifetime = exp - time.time()
            if iat is not None:
                lifetime = min(lifetime, exp - iat)
        fraction = self.random.uniform(REFRESH_FRACTION_LOW, REFRESH_FRACTION_HIGH)
        token = _Token(
            value=value,
            claims=claims,
            expires_at=now + lifetime,
            refresh_at=now + lifetime * fraction,
        )
        self._token = token
        self._new_token.set()
        self._new_token = trio.Event()
        _logger.debug("exchanged the credential for a JWT valid for %.0f s", lifetime)
        return token

    async def refresh_forever(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The background refresh (PROTOCOL.md 1.3); runs in the service nursery until cancelled.

        Waits for the first token, then refreshes at each token's ``refresh_at``; a token
        obtained meanwhile (on demand, or after a 401) restarts the wait with its own schedule.

        Error handling: a failed refresh (any `APIError`) is logged on ``tinkex_trio.auth`` at
        WARNING (the error type only) and retried after `REFRESH_RETRY_DELAY` s; senders still
        refresh on demand before the token runs out.
        """
        task_status.started()
        while True:
            token = self._token
            new_token = self._new_token
            if token is None:
                await new_token.wait()
                continue
            with trio.move_on_at(token.refresh_at) as scope:
                await new_token.wait()
            if not scope.cancelled_caught:
                continue
            try:
                await self.refresh(stale=token.value)
            except APIError as exc:
                _logger.warning(
                    "JWT refresh failed (%s); retrying in %.0f s",
                    type(exc).__name__,
                    REFRESH_RETRY_DELAY,
                )
                token.refresh_at = trio.current_time() + REFRESH_RETRY_DELAY

    @staticmethod
    async def _run_credential_cmd(cmd: str) -> str:
        """Run ``TINKER_CREDENTIAL_CMD`` in a shell; its stripped stdout is the credential (1.1)."""
        try:
            done = await trio.run_process(
                cmd, shell=True, capture_stdout=True, capture_stderr=True, check=False
            )
        except OSError as exc:
            raise APIError(f"TINKER_CREDENTIAL_CMD could not run: {type(exc).__name__}") from None
        credential = done.stdout.decode(errors="replace").strip()
        if done.returncode != 0 or not credential:
            raise APIError(
                f"TINKER_CREDENTIAL_CMD exited with status {done.returncode} and "
                f"{'no output' if not credential else 'output'}; it must print the credential"
            )
        return credential
