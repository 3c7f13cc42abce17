"""The SDK's HTTP layer: one httpx client, the headers, layer-A and layer-B retries, error mapping.

Synopsis::

    transport = Transport(config)                       # default pool: H11Pool
    resp = await transport.request("POST", "/api/v1/create_session", content=body)
    async with transport.stream("GET", signed_url) as resp:
        async for chunk in resp.aiter_bytes(): ...
    result = await transport.with_retries(lambda: submit(...))   # layer B
    await transport.aclose()

Everything above the HTTP level (futures, training, sampling, REST) calls this module only, so
headers, retries, error types and telemetry are decided in one place.

Retry layers (PROTOCOL.md 9.3):

- **Layer A** lives in :meth:`Transport.request`: a few quick retries of *one* call, with the
  same ``X-Idempotency-Key`` on every attempt so the server can deduplicate.
- **Layer B** is :meth:`Transport.with_retries`: retries of a whole operation (a new request,
  rebuilt by the caller) for up to five minutes, plus the 402 billing pause (PROTOCOL.md 9.6).

Credentials: the ``X-API-Key`` value is asked of :class:`tinkex_trio._auth.Credentials`
(``Transport.auth``) just before each send, so it can be an exchanged JWT that is refreshed
while the service runs (PROTOCOL.md 1.3); a ``401`` with ``WWW-Authenticate: ...
error="invalid_token"`` is answered with one exchange and one replay of the request. The
``X-API-Key``, the Cloudflare Access headers and ``Config.extra_headers`` are sent
only to the origin (scheme, host, port) of ``Config.base_url``. An httpx request hook strips them
from any other origin, including redirect hops, which httpx itself would otherwise forward (it
strips only ``Authorization`` on a cross-origin redirect).
"""

from __future__ import annotations

import email.utils
import logging
import math
import random as _random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Final, TypeVar, final

import httpx
import trio

from tinkex_trio._auth import TOKEN_PATH, Credentials
from tinkex_trio._version import __version__
from tinkex_trio.config import Config
from tinkex_trio.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    BillingError,
    ClientClosedError,
    status_error_for,
)
from tinkex_trio.telemetry import (
    RequestFailed,
    RequestFinished,
    RequestStarted,
    RetryScheduled,
    Telemetry,
)

__all__ = ["Transport"]

T = TypeVar("T")

_logger: Final = logging.getLogger("tinkex_trio.transport")

USER_AGENT: Final = f"tinkex-trio/{__version__}"
"""Sent as ``User-Agent`` (PROTOCOL.md 1.4 lists the official SDK's; we name ourselves)."""

IDEMPOTENCY_KEY_PREFIX: Final = "tinkex-trio-retry-"
"""``X-Idempotency-Key`` on non-GET requests: prefix + uuid4, one per call (PROTOCOL.md 1.4)."""

# Layer A (PROTOCOL.md 9.3): delay = min(0.5 * 2**n, 10) * U(0.75, 1.0), n = retries taken.
INITIAL_RETRY_DELAY: Final = 0.5
MAX_RETRY_DELAY: Final = 10.0
RETRY_JITTER_LOW: Final = 0.75
# A server-given retry-after(-ms) is obeyed only if 0 < value <= 60 s (PROTOCOL.md 1.4).
MAX_RETRY_AFTER: Final = 60.0

# Statuses retried by both layers (PROTOCOL.md 9.3), besides >= 500.
_RETRYABLE_STATUSES: Final = frozenset({408, 409, 429})

# Layer B (PROTOCOL.md 9.3): retry for up to 5 minutes, sleeping min(2**k, 30) s.
LAYER_B_BUDGET: Final = 300.0
LAYER_B_MAX_DELAY: Final = 30.0

# 402 billing pause (PROTOCOL.md 9.6).
BILLING_PAUSE_DELAY: Final = 5.0
BILLING_PAUSE_MAX: Final = 3600.0
BILLING_INCIDENT_RESET: Final = 300.0
"""After this long without a 402, the next 402 starts a new incident (a new pause window)."""
BILLING_WARNING_INTERVAL: Final = 60.0

# PROTOCOL.md 1.6 "Cloudflare reset": a 400 with an empty body is a connection reset in disguise,
# retried like a connection error (layer A) while this budget lasts. Each such retry spends one
# unit, each success gives one back (up to the cap), so a server that really answers bare 400s
# cannot keep every call retrying forever.
BARE_400_RETRY_BUDGET: Final = 16

# Headers that carry credentials; never sent to an origin other than base_url's.
_SECRET_HEADERS: Final = ("x-api-key", "cf-access-client-id", "cf-access-client-secret")


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return (url.scheme, url.host, url.port if url.port is not None else default)


def _is_retryable_status(status: int) -> bool:
    return status in _RETRYABLE_STATUSES or status >= 500


def _retry_after_seconds(headers: httpx.Headers) -> float | None:
    """The server's ``retry-after-ms`` or ``retry-after`` (seconds or HTTP-date), if present."""
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return float(value) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return when.timestamp() - time.time()


def _is_retryable_transport_error(exc: httpx.TransportError) -> bool:
    # Network failures, timeouts and a misbehaving peer may go away on retry; an unsupported
    # scheme or our own protocol violation will not.
    return isinstance(
        exc,
        httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError | httpx.ProxyError,
    )


def _is_bare_400(response: httpx.Response) -> bool:
    """A 400 with no body (``Content-Length: 0`` or none): a reset, not the server's answer."""
    return response.status_code == 400 and not response.content


def _map_transport_error(exc: httpx.RequestError) -> APIConnectionError:
    try:
        request: httpx.Request | None = exc.request
    except RuntimeError:  # httpx raises when no request was attached
        request = None
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"Request timed out ({type(exc).__name__}).", request=request)
    detail = str(exc) or type(exc).__name__
    return APIConnectionError(f"Connection error: {detail}", request=request)


def _status_reason(resp: httpx.Response) -> str:
    return f"status {resp.status_code}"


class _NoCookies(httpx.Cookies):
    """A cookie store that ignores `Set-Cookie`: the API is stateless (PROTOCOL.md 1.3)."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


@final
class Transport:
    """The SDK's HTTP client: one ``httpx.AsyncClient`` with the SDK's headers and retries.

    Args:
        config: where to connect and with which credentials, timeouts and retry count.
        transport: any ``httpx.AsyncBaseTransport``. Default: the lean :class:`H11Pool`. Pass
            ``httpx.AsyncHTTPTransport()`` for proxies or HTTP/2, or ``httpx.MockTransport`` in
            tests. The Transport takes ownership and closes it in :meth:`aclose`.
        telemetry: hub for request events; a private, handler-less hub if None.
        billing_pause_max: seconds of persistent 402s before :class:`BillingError` propagates.
        rng: the jitter source for layer-A back-off (inject a seeded ``random.Random`` in tests).

    Resource handling: :meth:`aclose` closes the client and every pooled connection; calls
    after it raise :class:`ClientClosedError`.
    """

    random: _random.Random
    """The jitter source for layer-A back-off; replace it for deterministic delays."""

    def __init__(
        self,
        config: Config,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        telemetry: Telemetry | None = None,
        billing_pause_max: float = BILLING_PAUSE_MAX,
        rng: _random.Random | None = None,
    ) -> None:
        if transport is None:
            from tinkex_trio._pool import H11Pool

            transport = H11Pool()
        self._config = config
        self._base_url = config.base_url
        self._base_origin = _origin(httpx.URL(config.base_url))
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self.random = rng if rng is not None else _random.Random()
        self._billing_pause_max = billing_pause_max
        self._billing_since: float | None = None
        self._billing_last = -math.inf
        self._billing_warned = -math.inf
        self._closed = False
        self._bare_400_budget = BARE_400_RETRY_BUDGET
        self.auth = Credentials(config, self._exchange_token, rng=self.random)

        # X-API-Key is not a default header: `_send_with_retries` asks `self.auth` per request.
        headers: dict[str, str] = {"User-Agent": USER_AGENT}
        if config.cf_access_client_id is not None:
            headers["CF-Access-Client-Id"] = config.cf_access_client_id
        if config.cf_access_client_secret is not None:
            headers["CF-Access-Client-Secret"] = config.cf_access_client_secret
        headers.update(config.extra_headers)
        self._secret_headers = (*_SECRET_HEADERS, *(k.lower() for k in config.extra_headers))
        self._client = httpx.AsyncClient(
            transport=transport,
            headers=headers,
            timeout=httpx.Timeout(config.timeout, connect=config.connect_timeout),
            follow_redirects=True,
            event_hooks={"request": [self._strip_foreign_credentials]},
        )
        # The Tinker API sets no cookies, and httpx parses every response for them (it builds
        # an email.message.Message of the headers each time): ~10 % of the client's CPU per
        # sample call in benchmarks/bench_fanout.py. `_cookies` is what the client reads.
        if isinstance(getattr(self._client, "_cookies", None), httpx.Cookies):
            self._client._cookies = _NoCookies()

    # -- properties ------------------------------------------------------------------------------

    @property
    def config(self) -> Config:
        return self._config

    @property
    def base_url(self) -> str:
        return self._base_url

    @property
    def is_closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return f"<Transport base_url={self._base_url!r} closed={self._closed}>"

    # -- plumbing --------------------------------------------------------------------------------

    async def _strip_foreign_credentials(self, request: httpx.Request) -> None:
        if _origin(request.url) != self._base_origin:
            for name in self._secret_headers:
                request.headers.pop(name, None)

    def _url(self, url_or_path: str) -> str:
        if url_or_path.startswith(("http://", "https://")):
            return url_or_path
        if not url_or_path.startswith("/"):
            url_or_path = "/" + url_or_path
        return self._base_url + url_or_path

    async def _exchange_token(self, credential: str) -> bytes:
        """``POST /api/v1/auth/token`` with the raw credential (PROTOCOL.md 1.3, 3.1)."""
        response = await self.request(
            "POST", TOKEN_PATH, content=b"{}", headers={"X-API-Key": credential}
        )
        return response.content

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError(
                "this Transport is closed; it was probably used after its `open_service` block "
                "exited. Make requests inside the block."
            )

    def _backoff(self, retries_taken: int, response: httpx.Response | None) -> float:
        """Layer-A delay before the next attempt (PROTOCOL.md 9.3)."""
        if response is not None:
            after = _retry_after_seconds(response.headers)
            if after is not None and 0 < after <= MAX_RETRY_AFTER:
                return after
        delay = min(INITIAL_RETRY_DELAY * 2.0**retries_taken, MAX_RETRY_DELAY)
        return delay * self.random.uniform(RETRY_JITTER_LOW, 1.0)

    @staticmethod
    def _should_retry(response: httpx.Response) -> bool:
        forced = response.headers.get("x-should-retry")
        if forced == "true":
            return True
        if forced == "false":
            return False
        return _is_retryable_status(response.status_code)

    @staticmethod
    def _log_deprecation(response: httpx.Response) -> None:
        note = response.headers.get("x-deprecation-note")
        if note:
            error = response.headers.get("x-deprecation-level") == "error"
            _logger.log(
                logging.ERROR if error else logging.WARNING, "Server deprecation note: %s", note
            )

    async def _send_with_retries(
        self,
        build: Callable[[int], httpx.Request],
        *,
        method: str,
        path: str,
        max_retries: int,
        raise_for_status: bool,
        stream: bool,
        follow_redirects: bool,
    ) -> httpx.Response:
        """Layer A. Returns a response (read unless ``stream``; error bodies are always read)."""
        telemetry = self.telemetry
        attempt = 0
        replayed = False
        while True:
            self._check_open()
            request = build(attempt)
            key: str | None = None
            # A caller-supplied X-API-Key (the JWT exchange) is sent as is; credentials go only
            # to the base URL's origin.
            if "x-api-key" not in request.headers and _origin(request.url) == self._base_origin:
                key = await self.auth.header_value()
                if key is not None:
                    request.headers["X-API-Key"] = key
            if telemetry.active:
                telemetry.emit(RequestStarted(method=method, path=path, attempt=attempt))
            started = trio.current_time()
            try:
                response = await self._client.send(
                    request, stream=stream, follow_redirects=follow_redirects
                )
            except httpx.TransportError as exc:
                error = _map_transport_error(exc)
                duration = trio.current_time() - started
                if telemetry.active:
                    telemetry.emit(
                        RequestFailed(
                            method=method,
                            path=path,
                            error_type=type(exc).__name__,
                            attempt=attempt,
                            duration=duration,
                        )
                    )
                if not _is_retryable_transport_error(exc) or attempt >= max_retries:
                    raise error from exc
                delay = self._backoff(attempt, None)
                await self._retry_sleep(method, path, attempt, delay, type(exc).__name__)
                attempt += 1
                continue
            except httpx.RequestError as exc:  # DecodingError, TooManyRedirects: not retried
                raise _map_transport_error(exc) from exc

            try:
                if stream and not response.is_success:
                    await response.aread()  # error bodies are small; needed for the message
            except BaseException:
                await response.aclose()
                raise
            duration = trio.current_time() - started
            if telemetry.active:
                telemetry.emit(
                    RequestFinished(
                        method=method,
                        path=path,
                        status=response.status_code,
                        attempt=attempt,
                        duration=duration,
                    )
                )
            self._log_deprecation(response)
            if (
                response.status_code == 401
                and key is not None
                and not replayed
                and self.auth.jwt_enabled
                and 'error="invalid_token"' in response.headers.get("www-authenticate", "")
            ):
                # PROTOCOL.md 1.3: the JWT was refused; exchange once and replay once.
                replayed = True
                await response.aclose()
                _logger.info("%s %s: token rejected (invalid_token); exchanging", method, path)
                await self.auth.refresh(stale=key)
                continue
            if response.is_success:
                self._bare_400_budget = min(self._bare_400_budget + 1, BARE_400_RETRY_BUDGET)
                return response
            if _is_bare_400(response) and self._bare_400_budget > 0:
                self._bare_400_budget -= 1
                await response.aclose()
                if attempt >= max_retries:
                    raise APIConnectionError(
                        "Connection error: HTTP 400 with an empty body (connection reset)",
                        request=request,
                    )
                delay = self._backoff(attempt, None)
                await self._retry_sleep(method, path, attempt, delay, "bare 400 (reset)")
                attempt += 1
                continue
            if attempt < max_retries and self._should_retry(response):
                await response.aclose()
                delay = self._backoff(attempt, response)
                await self._retry_sleep(method, path, attempt, delay, _status_reason(response))
                attempt += 1
                continue
            if raise_for_status:
                await response.aclose()
                raise status_error_for(response)
            return response

    async def _retry_sleep(
        self, method: str, path: str, attempt: int, delay: float, reason: str
    ) -> None:
        _logger.info(
            "Retrying %s %s in %.3f s (%s, attempt %d)", method, path, delay, reason, attempt + 1
        )
        if self.telemetry.active:
            self.telemetry.emit(
                RetryScheduled(
                    method=method, path=path, attempt=attempt, delay=delay, reason=reason
                )
            )
        await trio.sleep(delay)

    def _request_builder(
        self,
        method: str,
        url: str,
        *,
        content: bytes | None,
        content_type: str,
        params: Mapping[str, str | int] | None,
        headers: Mapping[str, str] | None,
        timeout: float | None,
        accept: str,
    ) -> Callable[[int], httpx.Request]:
        method = method.upper()
        read_timeout = self._config.timeout if timeout is None else timeout
        base: dict[str, str] = {"Accept": accept, "x-stainless-read-timeout": f"{read_timeout:g}"}
        if content is not None and method != "GET":
            base["Content-Type"] = content_type
        if method != "GET":
            base["X-Idempotency-Key"] = IDEMPOTENCY_KEY_PREFIX + uuid.uuid4().hex
        if headers:
            base.update(headers)  # the caller may supply its own idempotency key (copy_weights)
        http_timeout = httpx.Timeout(read_timeout, connect=self._config.connect_timeout)
        client = self._client

        def build(attempt: int) -> httpx.Request:
            return client.build_request(
                method,
                url,
                content=content,
                params=params,
                headers={**base, "x-stainless-retry-count": str(attempt)},
                timeout=http_timeout,
            )

        return build

    # -- public API ------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        content_type: str = "application/json",
        params: Mapping[str, str | int] | None = None,
        headers: Mapping[str, str] | None = None,
        # A per-read HTTP timeout handed to httpx (PROTOCOL.md 1.5), not an overall deadline:
        # callers bound the whole call with trio cancel scopes.
        timeout: float | None = None,
        max_retries: int | None = None,
        raise_for_status: bool = True,
        accept: str = "application/json",
        follow_redirects: bool = True,
    ) -> httpx.Response:
        """Send one API call and return its fully read response.

        ``path`` (``"/api/v1/..."``) is appended to the base URL's path. Headers: the SDK's
        (PROTOCOL.md 1.4: ``X-API-Key``, ``User-Agent``, ``X-Idempotency-Key`` on non-GET, one
        per call and stable across retries, ``x-stainless-retry-count``, Cloudflare and
        ``Config.extra_headers``), then ``headers``. ``timeout``: seconds per read (default
        ``Config.timeout``); ``max_retries``: layer-A retries (default ``Config.max_retries``;
        0 disables them).

        Error handling (layer A, PROTOCOL.md 9.3): retried are connection errors and timeouts
        (httpx NetworkError, TimeoutException, RemoteProtocolError), a 400 with an empty body
        (PROTOCOL.md 1.6 "Cloudflare reset": a connection error, within a budget of
        `BARE_400_RETRY_BUDGET` per transport that each success replenishes by one; once spent
        such a 400 is a plain :class:`BadRequestError`), responses 408, 409, 429
        and >= 500, or any non-2xx carrying ``x-should-retry: true`` (never one carrying
        ``false``). Delay: the server's ``retry-after-ms`` / ``retry-after`` (seconds or
        HTTP-date) if within (0, 60] s, else ``min(0.5 * 2**n, 10) * uniform(0.75, 1.0)`` s, with
        n the retries taken so far. Each retry is logged on ``tinkex_trio.transport`` at INFO
        and emitted as :class:`RetryScheduled`.

        Raises:
            APIStatusError: (the subclass for the status) for a non-2xx final response, when
                ``raise_for_status``; otherwise the response is returned.
            APITimeoutError / APIConnectionError: when no response came, ``from`` the httpx error.
            ClientClosedError: the transport is closed.
        """
        self._check_open()
        build = self._request_builder(
            method,
            self._url(path),
            content=content,
            content_type=content_type,
            params=params,
            headers=headers,
            timeout=timeout,
            accept=accept,
        )
        return await self._send_with_retries(
            build,
            method=method.upper(),
            path=path,
            max_retries=self._config.max_retries if max_retries is None else max_retries,
            raise_for_status=raise_for_status,
            stream=False,
            follow_redirects=follow_redirects,
        )

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        url_or_path: str,
        *,
        content: bytes | None = None,
        content_type: str = "application/json",
        params: Mapping[str, str | int] | None = None,
        headers: Mapping[str, str] | None = None,
        # A per-read HTTP timeout handed to httpx (PROTOCOL.md 1.5), not an overall deadline:
        # callers bound the whole call with trio cancel scopes.
        timeout: float | None = None,
        max_retries: int | None = None,
        raise_for_status: bool = True,
        accept: str = "*/*",
        follow_redirects: bool = True,
    ) -> AsyncIterator[httpx.Response]:
        """Send a request and yield its response with the body unread, for large downloads.

        ``url_or_path`` is a path under the base URL or an absolute ``http(s)://`` URL (e.g. a
        signed archive URL). Credentials go only to the base URL's origin.

        Error handling: as :meth:`request` (layer A) until the response head arrives; nothing
        is retried once the body is being read. Non-2xx responses have their body read.

        Resource handling: the response is closed when the block exits.
        """
        self._check_open()
        if url_or_path.startswith(("http://", "https://")):
            tele_path = httpx.URL(url_or_path).path
        else:
            tele_path = url_or_path
        build = self._request_builder(
            method,
            self._url(url_or_path),
            content=content,
            content_type=content_type,
            params=params,
            headers=headers,
            timeout=timeout,
            accept=accept,
        )
        response = await self._send_with_retries(
            build,
            method=method.upper(),
            path=tele_path,
            max_retries=self._config.max_retries if max_retries is None else max_retries,
            raise_for_status=raise_for_status,
            stream=True,
            follow_redirects=follow_redirects,
        )
        try:
            yield response
        finally:
            await response.aclose()

    async def with_retries(
        self, fn: Callable[[], Awaitable[T]], *, budget: float = LAYER_B_BUDGET
    ) -> T:
        """Layer B: call ``fn()`` until it succeeds, a non-retryable error occurs, or time runs out.

        ``fn`` must build a fresh request each time (new idempotency key, same ``seq_id``).

        Error handling (PROTOCOL.md 9.3, 9.6): retried are :class:`APIConnectionError` (and so
        :class:`APITimeoutError`) and :class:`APIStatusError` with status 408, 409, 429 or
        >= 500, sleeping ``min(2**k, 30)`` s (k = retries so far), cut to the time left, until
        ``budget`` seconds of trio time have passed since the first attempt; then the last error
        propagates. A 402 (:class:`BillingError`) is a billing pause instead: see
        :meth:`pause_for_billing`; time spent paused does not count against ``budget``. Other
        errors propagate at once. Retries are logged on ``tinkex_trio.transport`` at INFO.
        """
        started = trio.current_time()
        paused = 0.0
        retries = 0
        while True:
            try:
                return await fn()
            except BillingError as exc:
                before = trio.current_time()
                await self.pause_for_billing(exc)
                paused += trio.current_time() - before
                continue
            except APIConnectionError as exc:
                error: APIConnectionError | APIStatusError = exc
            except APIStatusError as exc:
                if not _is_retryable_status(exc.status_code):
                    raise
                error = exc
            remaining = budget - (trio.current_time() - started - paused)
            if remaining <= 0:
                raise error
            delay = min(2.0**retries, LAYER_B_MAX_DELAY, remaining)
            request = error.request
            method = request.method if request is not None else "?"
            path = request.url.path if request is not None else "?"
            reason = (
                _status_reason(error.response)
                if isinstance(error, APIStatusError) and error.response is not None
                else type(error).__name__
            )
            await self._retry_sleep(method, path, retries, delay, f"layer B: {reason}")
            retries += 1

    async def pause_for_billing(self, error: BillingError) -> None:
        """The 402 pause (PROTOCOL.md 9.6): sleep 5 s so the caller can retry, or raise ``error``.

        402s that keep coming for ``billing_pause_max`` seconds (default one hour) end the pause:
        ``error`` is raised. The incident is shared by every caller of this transport and
        resets after 5 minutes without a 402. A warning is logged on ``tinkex_trio.transport``
        at most once a minute. Used by layer B, and by result polling and sampling.
        """
        now = trio.current_time()
        if self._billing_since is None or now - self._billing_last > BILLING_INCIDENT_RESET:
            self._billing_since = now
        self._billing_last = now
        if now - self._billing_since >= self._billing_pause_max:
            raise error
        if now - self._billing_warned >= BILLING_WARNING_INTERVAL:
            self._billing_warned = now
            _logger.warning(
                "Tinker billing is not active (HTTP 402); pausing and retrying for up to %.0f s",
                self._billing_pause_max - (now - self._billing_since),
            )
        await trio.sleep(BILLING_PAUSE_DELAY)

    async def aclose(self) -> None:
        """Close the client and its connections. Idempotent."""
        self._closed = True
        await self._client.aclose()
