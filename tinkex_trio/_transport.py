"""The SDK's HTTP layer: one httpx client, the headers, the call policies, error mapping.

Synopsis::

    transport = Transport(config)                       # default pool: H11Pool
    resp = await transport.request("POST", "/api/v1/create_session", content=body)
    resp = await transport.request("POST", "/api/v1/optim_step", content=body, policy=SUBMIT)
    async with transport.stream("GET", signed_url) as resp:
        async for chunk in resp.aiter_bytes(): ...
    result = await transport.retry(SAMPLE_RETRY, one_sample)   # a whole multi-request operation
    await transport.aclose()

Everything above the HTTP level (futures, training, sampling, REST, the service) calls this
module only, and this module is the only place that loops on HTTP statuses: each call names
its `CallPolicy` (`tinkex_trio._policy`, the table of which statuses are retried, the back-off,
whether layer B applies, the billing pause, the throttle, the timeout and the ``Accept``
header), and :meth:`Transport.request` applies it. The 402 billing pause is one incident shared
by every call of the transport (PROTOCOL.md 9.6), and the bare-400 budget (1.6) is the
transport's too.

The direct path: when the transport is our own :class:`~tinkex_trio._pool.H11Pool` (the
default), a whole non-GET API call to the base URL with a plain path skips httpx's request
building and client machinery and goes through :meth:`H11Pool.fetch` (headers, telemetry,
policies and errors unchanged; the response is still an ``httpx.Response``, its ``request``
built only when an error message needs it). GETs, streams, query parameters and redirects go
through ``httpx.AsyncClient``, as does everything with a user-supplied transport.

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
import functools
import itertools
import logging
import os
import random as _random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Final, TypeVar, final

import httpx
import trio

from tinkex_trio import _policy
from tinkex_trio._auth import TOKEN_PATH, Credentials
from tinkex_trio._policy import CALL, CONNECTION, DOWNLOAD, CallPolicy, Retry, RetryState, Throttle
from tinkex_trio._pool import DirectTarget, Fetched, H11Pool
from tinkex_trio._version import __version__
from tinkex_trio.config import Config
from tinkex_trio.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
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

_T = TypeVar("_T")

_logger: Final = logging.getLogger("tinkex_trio.transport")

USER_AGENT: Final = f"tinkex-trio/{__version__}"
"""Sent as ``User-Agent`` (PROTOCOL.md 1.4 lists the official SDK's; we name ourselves)."""

IDEMPOTENCY_KEY_PREFIX: Final = "tinkex-trio-retry-"
"""``X-Idempotency-Key`` on non-GET requests, one per request (PROTOCOL.md 1.4): the prefix, 16
random hex digits drawn once per Transport (as unlikely to collide as a uuid4's 122 bits are
for the keys a server keeps), and a counter. A uuid4 per call was measurable at thousands of
calls a second; a counter is free."""

_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
# A path the direct path may send as is: already percent-encoded, no query, no dot segments
# (httpx would normalize those); anything else goes through httpx, which encodes it.
_plain_path: Final = re.compile(r"/[A-Za-z0-9\-_~/%!$&'()*+,;=:@]*").fullmatch

# Headers that carry credentials; never sent to an origin other than base_url's.
_SECRET_HEADERS: Final = ("x-api-key", "cf-access-client-id", "cf-access-client-secret")

ObserveFn = Callable[[httpx.Response], None]
"""Sees each response a policy row retries (a poll's 408 carries a queue state, 4.3)."""


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return (url.scheme, url.host, url.port if url.port is not None else default)


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


def _failed(
    telemetry: Telemetry,
    exc: httpx.TransportError,
    method: str,
    path: str,
    attempt: int,
    sent_at: float,
) -> httpx.TransportError:
    """Report a failed exchange; the error back if it is worth retrying, else raised mapped."""
    if telemetry.active:
        telemetry.emit(
            RequestFailed(
                method=method,
                path=path,
                error_type=type(exc).__name__,
                attempt=attempt,
                duration=trio.current_time() - sent_at,
            )
        )
    if not _is_retryable_transport_error(exc):
        raise _map_transport_error(exc) from exc
    return exc


def _finished(
    telemetry: Telemetry, method: str, path: str, status: int, attempt: int, sent_at: float
) -> None:
    telemetry.emit(
        RequestFinished(
            method=method,
            path=path,
            status=status,
            attempt=attempt,
            duration=trio.current_time() - sent_at,
        )
    )


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


class _DirectResponse(httpx.Response):
    """A response read by the pool's direct path; its ``request`` is built only if asked for
    (error messages, ``raise_for_status``): building one costs more than the whole exchange."""

    _make_request: Callable[[], httpx.Request]

    @classmethod
    def _read(cls, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> _DirectResponse:
        """A response whose (uncompressed) body is already read: the state
        ``httpx.Response(status, headers=..., content=body)`` ends in, without running the
        stream machinery (a tenth of the client's CPU per sample call).
        tests/test_direct_path.py checks it against httpx's own construction."""
        self = cls.__new__(cls)
        self.status_code = status
        self.headers = httpx.Headers(headers)
        self._request = None
        self.next_request = None
        self.extensions = {}
        self.history = []
        self.default_encoding = "utf-8"
        self.stream = httpx.ByteStream(body)
        self._content = body
        self._num_bytes_downloaded = len(body)
        self.is_stream_consumed = True
        self.is_closed = True
        return self

    @property
    def request(self) -> httpx.Request:
        if self._request is None:
            self._request = self._make_request()
        return self._request

    @request.setter
    def request(self, value: httpx.Request) -> None:
        self._request = value


class _NoCookies(httpx.Cookies):
    """A cookie store that ignores `Set-Cookie`: the API is stateless (PROTOCOL.md 1.3)."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


@final
class Transport:
    """The SDK's HTTP client: one ``httpx.AsyncClient`` with the SDK's headers and call policies.

    Args:
        config: where to connect and with which credentials, timeouts and layer-A retry count.
        transport: any ``httpx.AsyncBaseTransport``. Default: the lean :class:`H11Pool`. Pass
            ``httpx.AsyncHTTPTransport()`` for proxies or HTTP/2, or ``httpx.MockTransport`` in
            tests. The Transport takes ownership and closes it in :meth:`aclose`.
        telemetry: hub for request events; a private, handler-less hub if None.
        billing_pause_max: seconds of persistent 402s before :class:`BillingError` propagates
            (`open_service` sets it from the server's client config, PROTOCOL.md 9.6).
        rng: the jitter source of the back-offs (inject a seeded ``random.Random`` in tests).

    Resource handling: :meth:`aclose` closes the client and every pooled connection; calls
    after it raise :class:`ClientClosedError`.
    """

    random: _random.Random
    """The jitter source of the back-offs; replace it for deterministic delays."""

    billing_pause_max: float
    """Seconds of persistent 402s before the billing pause gives up (PROTOCOL.md 9.6)."""

    def __init__(
        self,
        config: Config,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        telemetry: Telemetry | None = None,
        billing_pause_max: float = _policy.BILLING_PAUSE_MAX,
        rng: _random.Random | None = None,
    ) -> None:
        if transport is None:
            transport = H11Pool()
        self._config = config
        self._base_url = config.base_url
        self._base_origin = _origin(httpx.URL(config.base_url))
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self.random = rng if rng is not None else _random.Random()
        self.billing_pause_max = billing_pause_max
        # The billing incident (PROTOCOL.md 9.6), shared by every call of this transport.
        self._billing_since: float | None = None
        self._billing_last = -float("inf")
        self._billing_warned = -float("inf")
        self._closed = False
        self._bare_400_budget = _policy.BARE_400_RETRY_BUDGET
        self._timeouts: dict[float, httpx.Timeout] = {}
        self.auth = Credentials(config, self._exchange_token, rng=self.random)

        # X-API-Key is not a default header: `_send` asks `self.auth` per request.
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
        self._key_prefix = IDEMPOTENCY_KEY_PREFIX + os.urandom(8).hex() + "-"
        self._key_counter = itertools.count()
        # The direct path (our own pool): API calls to base_url skip httpx's request building
        # and client machinery; the URL and the constant headers (the client's, as httpx would
        # send them, but Accept, which each call sets) are prepared here, once.
        self._pool = transport if isinstance(transport, H11Pool) else None
        self._direct: DirectTarget | None = None
        self._direct_prefix = ""
        self._fixed_names: frozenset[str] = frozenset()
        if self._pool is not None:
            base = httpx.URL(config.base_url)
            fixed = [(k, v) for k, v in self._client.headers.items() if k.lower() != "accept"]
            self._direct = self._pool.prepare(base, fixed)
            self._direct_prefix = base.raw_path.decode("ascii").rstrip("/")
            self._fixed_names = frozenset(k.lower() for k, _ in fixed)

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

    def _http_timeout(self, read: float) -> httpx.Timeout:
        """One `httpx.Timeout` per distinct read timeout (the policies have a handful)."""
        timeout = self._timeouts.get(read)
        if timeout is None:
            timeout = self._timeouts[read] = httpx.Timeout(
                read, connect=self._config.connect_timeout
            )
        return timeout

    @staticmethod
    def _log_deprecation(response: httpx.Response) -> None:
        note = response.headers.get("x-deprecation-note")
        if note:
            error = response.headers.get("x-deprecation-level") == "error"
            _logger.log(
                logging.ERROR if error else logging.WARNING, "Server deprecation note: %s", note
            )

    async def _send(
        self,
        method: str,
        url: str,
        path: str,
        *,
        policy: CallPolicy,
        content: bytes | None,
        content_type: str,
        params: Mapping[str, str | int] | None,
        headers: Mapping[str, str] | None,
        raise_for_status: bool,
        stream: bool,
        follow_redirects: bool,
        throttle: Throttle | None,
        weight: int,
        observe: ObserveFn | None,
        state: RetryState | None,
    ) -> httpx.Response:
        """Send one call under ``policy``; return its response (read unless ``stream``)."""
        self._check_open()
        method = method.upper()
        read_timeout = self._config.timeout if policy.timeout is None else policy.timeout
        base: dict[str, str] = {
            "Accept": policy.accept,
            "x-stainless-read-timeout": f"{read_timeout:g}",
        }
        if content is not None and method != "GET":
            base["Content-Type"] = content_type
        # Our key is new for every rebuilt request; a caller's own key (copy_weights) is kept on
        # every attempt.
        keyed = method != "GET" and not (
            headers and any(name.lower() == "x-idempotency-key" for name in headers)
        )
        if keyed:
            base["X-Idempotency-Key"] = self._new_idempotency_key()
        if headers:
            base.update(headers)
        http_timeout = self._http_timeout(read_timeout)
        client = self._client
        counts = None if state is None else state.counts
        attempt = 0  # retries of this very request: x-stainless-retry-count, layer A
        replayed = False
        started = trio.current_time()
        paused = 0.0
        # The direct path: our pool, a whole (not streamed) non-GET API call to base_url with
        # a plain path and no header of the client's own overridden. GETs (REST reads, archive
        # URLs, downloads) and everything else go through httpx, which follows redirects.
        direct = (
            self._direct is not None
            and not stream
            and params is None
            and method != "GET"
            and method != "HEAD"
            and _plain_path(path) is not None
            and "/." not in path
            and not (headers and any(name.lower() in self._fixed_names for name in headers))
        )
        caller_key = bool(headers) and any(name.lower() == "x-api-key" for name in base)
        while True:
            self._check_open()
            key: str | None = None
            request: httpx.Request | None = None
            exchanged: httpx.Response | httpx.TransportError | None = None
            if direct:
                # Credentials: the direct path only ever talks to base_url's origin.
                if not caller_key:
                    key = await self.auth.header_value()
                exchanged = await self._exchange_direct(
                    method, url, path, base, attempt, key, content, read_timeout, throttle, weight
                )
                if (
                    follow_redirects
                    and isinstance(exchanged, httpx.Response)
                    and exchanged.status_code in _REDIRECTS
                    and "location" in exchanged.headers
                ):
                    # Not an API answer: send this request again through httpx, which follows
                    # redirects as it always has (the server did not act on a redirected call).
                    direct = False
                    exchanged = None
            if exchanged is None:
                request = client.build_request(
                    method,
                    url,
                    content=content,
                    params=params,
                    headers={**base, "x-stainless-retry-count": str(attempt)},
                    timeout=http_timeout,
                )
                key = None
                # A caller-supplied X-API-Key (the JWT exchange) is sent as is; credentials go
                # only to the base URL's origin.
                if "x-api-key" not in request.headers and _origin(request.url) == self._base_origin:
                    key = await self.auth.header_value()
                    if key is not None:
                        request.headers["X-API-Key"] = key
                exchanged = await self._exchange(
                    request, method, path, attempt, stream, follow_redirects, throttle, weight
                )
            response: httpx.Response | None
            failure: httpx.TransportError | None
            if isinstance(exchanged, httpx.TransportError):
                response = None
                failure = exchanged
                outcome = CONNECTION
                why = type(exchanged).__name__
            else:
                response = exchanged
                failure = None
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
                    if self._bare_400_budget < _policy.BARE_400_RETRY_BUDGET:
                        self._bare_400_budget += 1
                    if throttle is not None:
                        throttle.on_success()
                    if counts is not None:
                        _policy.succeeded(policy, counts)
                    return response
                if _is_bare_400(response) and self._bare_400_budget > 0:
                    self._bare_400_budget -= 1
                    outcome = CONNECTION
                    why = "bare 400 (reset)"
                else:
                    outcome = response.status_code
                    why = f"status {outcome}"

            # The policy decides: a row retries it, the throttle or billing pause waits, or it
            # is final.
            if policy.retries:
                if counts is None:
                    counts = policy.new_state().counts
                # The server's hints (1.4) come with a real answer, not with a bare 400.
                hints = None if response is None or outcome == CONNECTION else response.headers
                decision = _policy.next_retry(
                    policy,
                    counts,
                    outcome,
                    max_retries=self._config.max_retries,
                    should_retry=None if hints is None else hints.get("x-should-retry"),
                    retry_after=None if hints is None else _retry_after_seconds(hints),
                    elapsed=trio.current_time() - started - paused,
                    rng=self.random,
                )
                if decision is not None:
                    index, delay = decision
                    row = policy.retries[index]
                    if response is not None:
                        if observe is not None:
                            observe(response)
                        await response.aclose()
                    await self._retry_sleep(method, path, row, counts[index] - 1, delay, why)
                    if row.count == "per_request":
                        attempt += 1
                    else:
                        attempt = 0
                        if keyed:
                            base["X-Idempotency-Key"] = self._new_idempotency_key()
                    continue
            if response is not None and (
                (outcome == 429 and policy.throttle and throttle is not None)
                or (outcome == 402 and policy.billing_pause)
            ):
                await response.aclose()
                if throttle is not None:
                    # PROTOCOL.md 9.5: a 429, or a 402 while paused, opens the window for
                    # every sampler; the next dispatch waits it out.
                    throttle.on_rate_limited(weight)
                if outcome == 402:
                    paused += await self._pause_for_billing(response)
                if counts is not None:
                    _policy.rebuilt(policy, counts, outcome)
                attempt = 0
                if keyed:
                    base["X-Idempotency-Key"] = self._new_idempotency_key()
                continue
            if failure is not None:
                raise _map_transport_error(failure) from failure
            assert response is not None
            if outcome == CONNECTION:
                await response.aclose()
                raise APIConnectionError(
                    "Connection error: HTTP 400 with an empty body (connection reset)",
                    request=response.request,
                )
            if raise_for_status:
                await response.aclose()
                raise status_error_for(response)
            return response

    def _new_idempotency_key(self) -> str:
        return f"{self._key_prefix}{next(self._key_counter):x}"

    async def _exchange_direct(
        self,
        method: str,
        url: str,
        path: str,
        base: dict[str, str],
        attempt: int,
        key: str | None,
        content: bytes | None,
        read_timeout: float,
        throttle: Throttle | None,
        weight: int,
    ) -> httpx.Response | httpx.TransportError:
        """:meth:`_exchange` through the pool's direct path (:meth:`H11Pool.fetch`): the same
        headers, telemetry, errors and throttle, without building an ``httpx.Request``."""
        pool, target = self._pool, self._direct
        assert pool is not None and target is not None
        pairs = [*base.items(), ("x-stainless-retry-count", str(attempt))]
        if key is not None:
            pairs.append(("X-API-Key", key))
        body = content
        if body is None and method in ("POST", "PUT", "PATCH"):
            body = b""  # as httpx: Content-Length: 0 (STYLE.md 4.13)
        telemetry = self.telemetry
        if telemetry.active:
            telemetry.emit(RequestStarted(method=method, path=path, attempt=attempt))
        sent_at = trio.current_time()
        fetch = functools.partial(
            pool.fetch,
            target,
            method,
            self._direct_prefix + path,
            pairs,
            body,
            connect_timeout=self._config.connect_timeout,
            read_timeout=read_timeout,
            write_timeout=read_timeout,
            pool_timeout=read_timeout,
        )
        try:
            if throttle is None:
                fetched = await fetch()
            else:
                async with throttle.dispatch(weight):
                    fetched = await fetch()
        except httpx.TransportError as exc:
            return _failed(telemetry, exc, method, path, attempt, sent_at)
        response = self._direct_response(fetched, method, url, pairs, content)
        if telemetry.active:
            _finished(telemetry, method, path, fetched.status, attempt, sent_at)
        self._log_deprecation(response)
        return response

    def _direct_response(
        self,
        fetched: Fetched,
        method: str,
        url: str,
        pairs: list[tuple[str, str]],
        content: bytes | None,
    ) -> httpx.Response:
        extensions = {"http_version": b"HTTP/1.1", "reason_phrase": fetched.reason}
        if any(name.lower() == b"content-encoding" for name, _ in fetched.headers):
            try:  # httpx decodes a compressed body (gzip, deflate, zstd, br) in its __init__
                response = _DirectResponse(
                    fetched.status,
                    headers=fetched.headers,
                    content=fetched.body,
                    extensions=extensions,
                )
            except httpx.DecodingError as exc:
                raise _map_transport_error(exc) from exc
        else:
            response = _DirectResponse._read(fetched.status, fetched.headers, fetched.body)
            response.extensions = extensions
        client = self._client

        def make_request() -> httpx.Request:
            # What was sent, as an httpx.Request for error messages; the key is left out.
            shown = {k: v for k, v in pairs if k.lower() != "x-api-key"}
            return client.build_request(method, url, content=content, headers=shown)

        response._make_request = make_request
        return response

    async def _exchange(
        self,
        request: httpx.Request,
        method: str,
        path: str,
        attempt: int,
        stream: bool,
        follow_redirects: bool,
        throttle: Throttle | None,
        weight: int,
    ) -> httpx.Response | httpx.TransportError:
        """One HTTP exchange and its telemetry: the response (an error's body read even when
        streaming), or the transport error if it is worth retrying; others are raised mapped."""
        telemetry = self.telemetry
        if telemetry.active:
            telemetry.emit(RequestStarted(method=method, path=path, attempt=attempt))
        sent_at = trio.current_time()
        client = self._client
        try:
            if throttle is None:
                response = await client.send(
                    request, stream=stream, follow_redirects=follow_redirects
                )
            else:
                async with throttle.dispatch(weight):
                    response = await client.send(
                        request, stream=stream, follow_redirects=follow_redirects
                    )
        except httpx.TransportError as exc:
            return _failed(telemetry, exc, method, path, attempt, sent_at)
        except httpx.RequestError as exc:  # DecodingError, TooManyRedirects: not retried
            raise _map_transport_error(exc) from exc
        try:
            if stream and not response.is_success:
                await response.aread()  # error bodies are small; needed for the message
        except BaseException:
            await response.aclose()
            raise
        if telemetry.active:
            _finished(telemetry, method, path, response.status_code, attempt, sent_at)
        self._log_deprecation(response)
        return response

    async def _retry_sleep(
        self, method: str, path: str, row: Retry, attempt: int, delay: float, why: str
    ) -> None:
        reason = f"{row.label}: {why}" if row.label else why
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

    async def _pause_for_billing(self, response: httpx.Response) -> float:
        """The 402 pause (PROTOCOL.md 9.6): sleep, and return how long; or raise `BillingError`.

        One incident for the whole transport: it starts at the first 402, ends after
        `BILLING_INCIDENT_RESET` s without one, and gives up (raising the 402's
        :class:`BillingError`) once 402s have lasted `billing_pause_max` s. A warning is
        logged on ``tinkex_trio.transport`` at most once a minute.
        """
        now = trio.current_time()
        if self._billing_since is None or now - self._billing_last > _policy.BILLING_INCIDENT_RESET:
            self._billing_since = now
        self._billing_last = now
        if now - self._billing_since >= self.billing_pause_max:
            raise status_error_for(response)
        if now - self._billing_warned >= _policy.BILLING_WARNING_INTERVAL:
            self._billing_warned = now
            _logger.warning(
                "Tinker billing is not active (HTTP 402); pausing and retrying for up to %.0f s",
                self.billing_pause_max - (now - self._billing_since),
            )
        await trio.sleep(_policy.BILLING_RETRY_DELAY)
        return trio.current_time() - now

    # -- public API ------------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        policy: CallPolicy = CALL,
        content: bytes | None = None,
        content_type: str = "application/json",
        params: Mapping[str, str | int] | None = None,
        headers: Mapping[str, str] | None = None,
        raise_for_status: bool = True,
        follow_redirects: bool = True,
        throttle: Throttle | None = None,
        weight: int = 0,
        observe: ObserveFn | None = None,
        state: RetryState | None = None,
    ) -> httpx.Response:
        """Send one API call under ``policy`` and return its fully read response.

        ``path`` (``"/api/v1/..."``) is appended to the base URL's path. Headers: the SDK's
        (PROTOCOL.md 1.4: ``X-API-Key``, ``User-Agent``, ``Accept`` from the policy,
        ``X-Idempotency-Key`` on non-GET, stable across the layer-A retries of one request and
        new for every rebuilt one, ``x-stainless-retry-count``, ``x-stainless-read-timeout``,
        Cloudflare and ``Config.extra_headers``), then ``headers`` (a caller's own idempotency
        key is kept on every attempt). The read timeout is the policy's (1.5).

        ``throttle`` and ``weight`` (the ``sample`` policy): every attempt is sent inside
        ``throttle.dispatch(weight)``; a 429 opens its window. ``observe`` sees each response a
        row retries. ``state`` carries the rows' counts across calls (a future's polls).

        Error handling: as ``policy`` says (`tinkex_trio._policy`; its rows give the retried
        outcomes, back-offs and limits). Every retry is logged on ``tinkex_trio.transport`` at
        INFO and emitted as :class:`RetryScheduled`; a billing pause logs a WARNING at most
        once a minute. A 400 with an empty body is a connection reset (PROTOCOL.md 1.6) while
        the transport's budget of `BARE_400_RETRY_BUDGET` lasts (each success gives one back);
        once spent, such a 400 is a plain :class:`BadRequestError`.

        Raises:
            APIStatusError: (the subclass for the status) for a non-2xx final response, when
                ``raise_for_status``; otherwise the response is returned.
            BillingError: 402s lasted longer than the billing pause allows.
            APITimeoutError / APIConnectionError: when no response came, ``from`` the httpx error.
            ClientClosedError: the transport is closed.
        """
        return await self._send(
            method,
            self._url(path),
            path,
            policy=policy,
            content=content,
            content_type=content_type,
            params=params,
            headers=headers,
            raise_for_status=raise_for_status,
            stream=False,
            follow_redirects=follow_redirects,
            throttle=throttle,
            weight=weight,
            observe=observe,
            state=state,
        )

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        url_or_path: str,
        *,
        policy: CallPolicy = DOWNLOAD,
        content: bytes | None = None,
        content_type: str = "application/json",
        params: Mapping[str, str | int] | None = None,
        headers: Mapping[str, str] | None = None,
        raise_for_status: bool = True,
        follow_redirects: bool = True,
    ) -> AsyncIterator[httpx.Response]:
        """Send a request and yield its response with the body unread, for large downloads.

        ``url_or_path`` is a path under the base URL or an absolute ``http(s)://`` URL (e.g. a
        signed archive URL). Credentials go only to the base URL's origin.

        Error handling: as :meth:`request` under ``policy`` (layer A by default) until the
        response head arrives; nothing is retried once the body is being read. Non-2xx
        responses have their body read.

        Resource handling: the response is closed when the block exits.
        """
        if url_or_path.startswith(("http://", "https://")):
            tele_path = httpx.URL(url_or_path).path
        else:
            tele_path = url_or_path
        response = await self._send(
            method,
            self._url(url_or_path),
            tele_path,
            policy=policy,
            content=content,
            content_type=content_type,
            params=params,
            headers=headers,
            raise_for_status=raise_for_status,
            stream=True,
            follow_redirects=follow_redirects,
            throttle=None,
            weight=0,
            observe=None,
            state=None,
        )
        try:
            yield response
        finally:
            await response.aclose()

    async def retry(self, row: Retry, operation: Callable[[int], Awaitable[_T]]) -> _T:
        """Run ``operation(attempt)`` (attempt 0, 1, ...) until it succeeds or ``row`` gives up.

        For an operation of several requests that is retried as a whole, each time anew
        (PROTOCOL.md 9.4: a ``sample()`` is a submit and its polls, and each retry is a new
        submission with a new ``seq_id``). Each request inside it has its own policy.

        Error handling: an :class:`APIConnectionError` (the outcome `CONNECTION`) or an
        :class:`APIStatusError` whose status is in ``row.on`` is retried after ``row``'s
        back-off (its ``immediate``, ``limit`` and ``budget`` apply; n counts every retry of
        the operation), logged and emitted like every retry; anything else, and the last error
        once ``row`` gives up, propagates.
        """
        started = trio.current_time()
        attempt = 0
        while True:
            try:
                return await operation(attempt)
            except APIConnectionError as exc:
                error: APIConnectionError | APIStatusError = exc
                outcome = CONNECTION
                why = type(exc).__name__
            except APIStatusError as exc:
                error = exc
                outcome = exc.status_code
                why = f"status {outcome}"
            if outcome not in row.on or (row.limit is not None and attempt >= row.limit):
                raise error
            if attempt < row.immediate:
                delay = 0.0
            else:
                delay = row.backoff.delay(attempt - row.immediate, self.random)
            if row.budget is not None:
                remaining = row.budget - (trio.current_time() - started)
                if remaining <= 0:
                    raise error
                delay = min(delay, remaining)
            request = error.request
            method = request.method if request is not None else "?"
            path = request.url.path if request is not None else "?"
            await self._retry_sleep(method, path, row, attempt, delay, why)
            attempt += 1

    async def aclose(self) -> None:
        """Close the client and its connections. Idempotent."""
        self._closed = True
        await self._client.aclose()
