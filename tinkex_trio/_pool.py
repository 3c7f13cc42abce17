"""A lean HTTP/1.1 keep-alive connection pool: h11 over trio streams, as an httpx transport.

Why: httpx's default transport (httpcore's pool) spends ~5 ms of client CPU per request on trio;
this pool keeps httpx as the SDK's interface and does the HTTP/1.1 work with far less overhead
(DESIGN.md "HTTP"; numbers in benchmarks/bench_transport.py). It does only what the SDK needs:
HTTP/1.1, plain TCP or TLS (``trio.SSLStream`` with ``ssl.create_default_context()``), keep-alive,
no proxies, no HTTP/2. For those, pass ``httpx.AsyncHTTPTransport()`` to the Transport instead.

How a request runs:

1. Take an in-flight slot (at most ``max_connections`` requests at once, waiting at most the
   request's ``pool`` timeout, else ``httpx.PoolTimeout``).
2. Take the most recently used idle connection to the same (scheme, host, port), skipping and
   closing stale ones: idle longer than ``keepalive_expiry``, or readable while idle (the server
   closed it; STYLE.md 4.8). Otherwise connect, within the ``connect`` timeout.
3. Send the head and body in one write (every body carries Content-Length, STYLE.md 4.13), then
   read up to the response head, each read within the ``read`` timeout.
4. Return an ``httpx.Response`` whose body streams from the connection. When the body is read to
   its end and both sides are DONE, the connection returns to the idle pool (``start_next_cycle``);
   in every other case (``Connection: close``, a half-read body, an error, cancellation) it is
   closed (STYLE.md 4.2, 4.3, 4.5). One request per connection at a time; no pipelining (4.4).

The direct path, :meth:`H11Pool.fetch`: the SDK's Transport sends its API calls (whole, not
streamed, to its base URL) here without building an ``httpx.Request``: the origin and constant
headers are serialized once (:meth:`H11Pool.prepare`), the request head is written with the
body in one piece, and the whole response is read and returned as a :class:`Fetched`. The
common response head (HTTP/1.1, a status from 200, ``Content-Length``) is parsed by
:func:`tinkex_trio._http1.parse_response_head`; anything else (chunked or close-delimited
bodies, 1xx, 204/304, HTTP/1.0, malformed heads) is handed with the bytes already received to
a fresh h11 connection that frames and checks it. Slots, idle connections, the stale-connection
retry, timeouts and the httpx exception types are the same as for ``handle_async_request``;
one cancel scope per exchange carries the per-operation deadlines.

Error handling:

- Failures are raised as httpx's own exceptions, chosen in one place (:func:`_map_errors`):
  ConnectError / ConnectTimeout, WriteError / WriteTimeout, ReadError / ReadTimeout,
  RemoteProtocolError, LocalProtocolError, PoolTimeout. The SDK's retry code therefore treats this
  pool, ``AsyncHTTPTransport`` and ``MockTransport`` alike.
- **One retry, for a stale reused connection only.** A keep-alive connection can be closed by the
  server just as we reuse it; no idle check can close that race. If a *reused* connection fails
  (EOF or reset while writing the request or before the first byte of the response), the request
  is sent once more on a fresh connection. This includes POST: a server that received the request
  but neither answered nor sent a byte is indistinguishable from one that closed the idle socket,
  and the SDK sends an ``X-Idempotency-Key`` on every non-GET request so a server can deduplicate.
  Anything else (a fresh connection failing, a failure after any response byte, a timeout, a
  body that is a stream and cannot be replayed) is not retried here; the Transport's layer-A
  policy decides.
- A write error does not stop the read: a server may reject a request early with a complete error
  response and close (STYLE.md 4.10); that response is returned.

Resource handling: every connection is closed on every exit path that does not return it to the
pool. Closing is synchronous (the socket is closed without a TLS close_notify), so release cannot
be interrupted by cancellation and needs no shield. :meth:`H11Pool.aclose` closes every
connection, idle or in use.
"""

from __future__ import annotations

import math
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Final, Literal, NamedTuple, NoReturn, TypeVar, cast, final

import h11
import httpx
import msgspec
import trio

from tinkex_trio._http1 import parse_response_head

__all__ = ["DirectTarget", "Fetched", "H11Pool", "PoolStatistics"]

DEFAULT_MAX_CONNECTIONS: Final = 1000
"""Requests in flight at once (= connections in use). PROTOCOL.md 1.6: the official SDK's limit."""

DEFAULT_MAX_IDLE_CONNECTIONS: Final = 1000
"""Idle keep-alive connections kept across all hosts. Large, because the SDK fans out thousands of
concurrent calls to one host: a small cap (httpx's default is 20) makes every burst reconnect."""

DEFAULT_KEEPALIVE_EXPIRY: Final = 5.0
"""Seconds an idle connection may be reused; matches common server keep-alive timeouts
(Hypercorn's default is 5 s), so we rarely race a server's own idle close."""

MAX_HEADER_BYTES: Final = 100 * 1024
"""Largest response head accepted, as httpcore (h11's own default is 16 KiB; STYLE.md 4.12)."""

READ_SIZE: Final = 64 * 1024
_COALESCE_LIMIT: Final = 64 * 1024
"""Bodies up to this size are joined to the head and sent in one write."""

_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_TOKEN_CHARS: Final = (
    b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
)
_BODY_METHODS: Final = frozenset({b"POST", b"PUT", b"PATCH"})

_Origin = tuple[str, str, int]
_T = TypeVar("_T")
_Phase = Literal["connect", "write", "read"]

_TIMEOUT_ERRORS: Final[dict[_Phase, type[httpx.TimeoutException]]] = {
    "connect": httpx.ConnectTimeout,
    "write": httpx.WriteTimeout,
    "read": httpx.ReadTimeout,
}
_NETWORK_ERRORS: Final[dict[_Phase, type[httpx.NetworkError]]] = {
    "connect": httpx.ConnectError,
    "write": httpx.WriteError,
    "read": httpx.ReadError,
}


@contextmanager
def _map_errors(phase: _Phase) -> Iterator[None]:
    """Turn trio, OS, TLS and h11 failures into the httpx exception for this phase."""
    try:
        yield
    except trio.TooSlowError as exc:
        raise _TIMEOUT_ERRORS[phase](f"{phase} timed out") from exc
    except h11.RemoteProtocolError as exc:
        raise httpx.RemoteProtocolError(str(exc)) from exc
    except h11.LocalProtocolError as exc:
        raise httpx.LocalProtocolError(str(exc)) from exc
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        # OSError covers refused/unreachable/DNS (socket.gaierror) and ssl.SSLError.
        raise _NETWORK_ERRORS[phase](str(exc) or type(exc).__name__) from exc


def _deadline(seconds: float | None) -> AbstractContextManager[object]:
    if seconds is None or math.isinf(seconds):
        return nullcontext()
    return trio.fail_after(seconds)


class _StaleConnection(Exception):
    """Internal: the connection died before any response byte (EOF or reset).

    ``error`` is the httpx type to raise when it is not retried: RemoteProtocolError for a clean
    EOF ("Server disconnected without sending a response", as httpcore), ReadError for a reset.
    """

    def __init__(self, message: str, error: type[httpx.TransportError]) -> None:
        super().__init__(message)
        self.error = error


@final
class PoolStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of :class:`H11Pool` (``pool.statistics()``)."""

    idle_connections: int
    """Open connections waiting in the pool."""
    active_connections: int
    """Connections carrying a request or an unread response body."""
    connections_opened: int
    """Connections opened since the pool was created."""
    requests_sent: int
    """Requests sent, including stale-connection retries."""
    requests_on_reused_connections: int
    """Requests sent on a connection that had served an earlier response."""
    stale_retries: int
    """Requests re-sent on a fresh connection after a reused one turned out dead."""


@final
class DirectTarget:
    """An origin and the request headers every request to it carries, serialized once
    (:meth:`H11Pool.prepare`); what :meth:`H11Pool.fetch` sends to."""

    __slots__ = ("fixed", "fixed_pairs", "origin")

    def __init__(
        self, origin: _Origin, fixed: bytes, fixed_pairs: list[tuple[bytes, bytes]]
    ) -> None:
        self.origin = origin
        self.fixed = fixed
        self.fixed_pairs = fixed_pairs


class Fetched(NamedTuple):
    """A whole response read by :meth:`H11Pool.fetch`."""

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


class _Connection:
    __slots__ = (
        "got_response_bytes",
        "h11",
        "idle_since",
        "origin",
        "responses",
        "socket",
        "stream",
    )

    def __init__(
        self, stream: trio.abc.Stream, socket: trio.socket.SocketType, origin: _Origin
    ) -> None:
        self.stream = stream
        self.socket = socket
        self.origin = origin
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.responses = 0  # responses fully received: > 0 means a reused connection
        self.idle_since = 0.0
        self.got_response_bytes = False

    def close(self) -> None:
        """Close at once, without awaiting: safe in cleanup and under cancellation."""
        self.socket.close()

    def is_usable_idle(self, now: float, expiry: float) -> bool:
        # A readable idle socket means EOF (the server closed it) or unexpected bytes: unusable.
        return (
            now - self.idle_since < expiry
            and self.socket.fileno() != -1
            and not self.socket.is_readable()
        )


@final
class H11Pool(httpx.AsyncBaseTransport):
    """An ``httpx.AsyncBaseTransport``: HTTP/1.1 keep-alive connections via h11 on trio streams.

    Args:
        max_connections: requests (so connections) in use at once, over all hosts.
        max_idle_connections: idle keep-alive connections kept, over all hosts.
        keepalive_expiry: seconds an idle connection stays reusable.
        ssl_context: for https; default ``ssl.create_default_context()`` (built once per pool).

    Timeouts come from each request's ``extensions["timeout"]`` (set by httpx from
    ``httpx.Timeout``): ``pool`` to get an in-flight slot, ``connect``, and ``write`` / ``read``
    per socket operation.

    Error handling: see the module docstring (httpx exception types; one retry on a stale reused
    connection, POST included, when no response byte arrived).
    """

    def __init__(
        self,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_idle_connections: int = DEFAULT_MAX_IDLE_CONNECTIONS,
        keepalive_expiry: float = DEFAULT_KEEPALIVE_EXPIRY,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        if max_idle_connections < 0:
            raise ValueError(f"max_idle_connections must be >= 0, got {max_idle_connections}")
        self._max_connections = max_connections
        self._max_idle = max_idle_connections
        self._expiry = keepalive_expiry
        self._ssl_context = ssl_context
        self._slots = trio.Semaphore(max_connections)
        self._idle: dict[_Origin, deque[_Connection]] = {}
        self._idle_count = 0
        self._active: set[_Connection] = set()
        self._closed = False
        self._opened = 0
        self._sent = 0
        self._reused = 0
        self._stale_retries = 0

    # -- public --------------------------------------------------------------------------------

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(
            idle_connections=self._idle_count,
            active_connections=len(self._active),
            connections_opened=self._opened,
            requests_sent=self._sent,
            requests_on_reused_connections=self._reused,
            stale_retries=self._stale_retries,
        )

    def __repr__(self) -> str:
        return (
            f"<H11Pool idle={self._idle_count} active={len(self._active)} "
            f"max_connections={self._max_connections} closed={self._closed}>"
        )

    async def aclose(self) -> None:
        """Close every connection, idle or in use. Idempotent; the pool cannot be reused."""
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
        self._idle_count = 0
        for conn in self._active:
            conn.close()  # in-flight requests fail with ReadError/WriteError
        await trio.lowlevel.checkpoint()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``; the returned response's body must be read or closed (httpx rule).

        Raises:
            httpx.UnsupportedProtocol: a scheme other than http/https.
            httpx.PoolTimeout / ConnectError / ConnectTimeout / WriteError / WriteTimeout /
                ReadError / ReadTimeout / RemoteProtocolError / LocalProtocolError.
            RuntimeError: the pool is closed.
        """
        if self._closed:
            raise RuntimeError("H11Pool is closed; create a new transport")
        url = request.url
        scheme = url.scheme
        if scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(
                f"H11Pool speaks http and https, not {scheme!r} ({url})"
            )
        origin = (scheme, url.host, url.port or _DEFAULT_PORTS[scheme])
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})

        pool_timeout = timeouts.get("pool")
        try:
            with _deadline(pool_timeout):
                await self._slots.acquire()
        except trio.TooSlowError:
            raise httpx.PoolTimeout(
                f"no connection slot free within {pool_timeout} s ({self._max_connections} in use)"
            ) from None

        try:
            head, body = self._encode_request(request)
        except BaseException:
            self._slots.release()
            raise
        conn, response = await self._on_connection(
            origin,
            timeouts.get("connect"),
            lambda conn: self._send_and_receive_head(conn, request, head, body, timeouts),
            retry_stale=body is not None,
        )
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers.raw_items(),
            stream=_ResponseStream(self, conn, timeouts.get("read")),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": response.reason},
        )

    # -- the direct path -----------------------------------------------------------------------

    @staticmethod
    def prepare(url: httpx.URL, headers: Sequence[tuple[str, str]]) -> DirectTarget:
        """The origin of ``url`` and its constant headers (``Host`` first, then ``headers``),
        serialized once for :meth:`fetch`.

        Raises:
            httpx.UnsupportedProtocol: a scheme other than http/https.
            ValueError: a header name that is not a token, or a value with CR, LF or NUL.
        """
        scheme = url.scheme
        if scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(f"H11Pool speaks http and https, not {scheme!r}")
        origin = (scheme, url.host, url.port or _DEFAULT_PORTS[scheme])
        pairs = [(b"Host", url.netloc)]
        for name, value in headers:
            raw_name, raw_value = name.encode("ascii"), value.encode("latin-1")
            if (
                not raw_name
                or raw_name.translate(None, _TOKEN_CHARS)
                or any(c in raw_value for c in (b"\r", b"\n", b"\0"))
            ):
                raise ValueError(f"header {name!r} cannot be sent (bad name or control character)")
            pairs.append((raw_name, raw_value))
        fixed = b"".join(b"%s: %s\r\n" % pair for pair in pairs)
        return DirectTarget(origin, fixed, pairs)

    async def fetch(
        self,
        target: DirectTarget,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]],
        body: bytes | None,
        *,
        connect_timeout: float | None,
        read_timeout: float | None,
        write_timeout: float | None,
        pool_timeout: float | None,
    ) -> Fetched:
        """Send one request and read its whole response: the SDK's hot path, without httpx.

        ``path`` is the request target as sent (already percent-encoded, no spaces);
        ``headers`` come after ``target``'s fixed ones; a body gets ``Content-Length``. The
        request head is written in one piece; the response head is read by
        :func:`tinkex_trio._http1.parse_response_head` and, when it is not the common shape,
        by h11 (chunked bodies, close-delimited bodies, HTTP/1.0, 1xx).

        Connections, slots, timeouts, the one retry of a stale reused connection and the
        errors raised are those of :meth:`handle_async_request` (the module docstring).

        Raises:
            httpx.LocalProtocolError: a header holds CR, LF or NUL, or a method or path that
                cannot be sent.
            RuntimeError: the pool is closed.
        """
        if self._closed:
            raise RuntimeError("H11Pool is closed; create a new transport")
        block = "".join([f"{name}: {value}\r\n" for name, value in headers])
        if (
            block.count("\n") != len(headers)
            or block.count("\r") != len(headers)
            or "\0" in block
            or " " in path
            or "\r" in path
            or "\n" in path
        ):
            raise httpx.LocalProtocolError("a request header or the path holds a control character")
        try:
            head = b"".join(
                (
                    f"{method} {path} HTTP/1.1\r\n".encode("ascii"),
                    target.fixed,
                    block.encode("latin-1"),
                    b"" if body is None else b"Content-Length: %d\r\n" % len(body),
                    b"\r\n",
                )
            )
        except UnicodeEncodeError as exc:
            raise httpx.LocalProtocolError(f"cannot encode the request head: {exc}") from None
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            try:
                with _deadline(pool_timeout):
                    await self._slots.acquire()
            except trio.TooSlowError:
                raise httpx.PoolTimeout(
                    f"no connection slot free within {pool_timeout} s "
                    f"({self._max_connections} in use)"
                ) from None

        def h11_request() -> h11.Request:
            pairs = [*target.fixed_pairs, *((n.encode(), v.encode("latin-1")) for n, v in headers)]
            if body is not None:
                pairs.append((b"Content-Length", b"%d" % len(body)))
            return h11.Request(method=method, target=path, headers=pairs)

        conn, (fetched, reusable) = await self._on_connection(
            target.origin,
            connect_timeout,
            lambda conn: self._exchange_direct(
                conn, head, body, h11_request, read_timeout, write_timeout
            ),
            retry_stale=True,
        )
        if reusable:
            self._return_idle(conn)
        else:
            self._discard(conn)
        self._slots.release()
        return fetched

    async def _on_connection(
        self,
        origin: _Origin,
        connect_timeout: float | None,
        exchange: Callable[[_Connection], Awaitable[_T]],
        *,
        retry_stale: bool,
    ) -> tuple[_Connection, _T]:
        """`exchange` on an idle connection to `origin`, or a new one; the connection and what
        `exchange` returned. A reused connection the server had closed (`_StaleConnection`) is
        retried once, on a fresh connection (other idle ones may be stale too), when
        `retry_stale` says the request can be sent again. On any failure the connection is
        discarded and the caller's slot released."""
        conn: _Connection | None = None
        try:
            retried = False
            while True:
                conn = None if retried else self._checkout(origin)
                if conn is None:
                    conn = await self._connect(origin, connect_timeout)
                self._active.add(conn)
                reused = conn.responses > 0
                self._sent += 1
                self._reused += reused
                try:
                    return conn, await exchange(conn)
                except _StaleConnection as exc:
                    self._discard(conn)
                    conn = None
                    if reused and not retried and retry_stale:
                        retried = True
                        self._stale_retries += 1
                        continue
                    raise exc.error(str(exc)) from exc
        except BaseException:
            if conn is not None:
                self._discard(conn)
            self._slots.release()
            raise

    async def _exchange_direct(
        self,
        conn: _Connection,
        head: bytes,
        body: bytes | None,
        h11_request: Callable[[], h11.Request],
        read_timeout: float | None,
        write_timeout: float | None,
    ) -> tuple[Fetched, bool]:
        """Write the request, read the whole response: (response, whether conn is reusable).

        One cancel scope carries the per-operation deadlines (moved before each write and
        read), and one ``try`` maps failures to httpx's types, as :func:`_map_errors` does:
        cheaper than a ``fail_after`` and a context manager per socket operation.
        """
        exchange = _DirectExchange(conn, read_timeout)
        result: tuple[Fetched, bool] | None = None
        try:
            with exchange.scope:
                result = await exchange.run(head, body, h11_request, write_timeout)
        except h11.RemoteProtocolError as exc:
            raise httpx.RemoteProtocolError(str(exc)) from exc
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc)) from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
        if result is None:  # the scope's deadline passed
            if exchange.writing:
                raise httpx.WriteTimeout("write timed out")
            raise httpx.ReadTimeout("read timed out")
        return result

    # -- internals -----------------------------------------------------------------------------

    @staticmethod
    def _encode_request(request: httpx.Request) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
        """The head's headers and the buffered body (None when the body is an unread stream)."""
        headers = list(request.headers.raw)
        try:
            body: bytes | None = request.content
        except httpx.RequestNotRead:
            body = None
        names = {name.lower() for name, _ in headers}
        if b"content-length" not in names and b"transfer-encoding" not in names:
            if body is None:
                headers.append((b"Transfer-Encoding", b"chunked"))
            elif body or request.method.encode() in _BODY_METHODS:
                # STYLE.md 4.13: without framing headers the body would be sent as empty.
                headers.append((b"Content-Length", str(len(body)).encode()))
        return headers, body

    def _checkout(self, origin: _Origin) -> _Connection | None:
        conns = self._idle.get(origin)
        if not conns:
            return None
        now = trio.current_time()
        while conns:
            conn = conns.pop()  # most recently used first: the likeliest to be alive
            self._idle_count -= 1
            if conn.is_usable_idle(now, self._expiry):
                return conn
            conn.close()
        return None

    def _checkin(self, conn: _Connection) -> None:
        """Return a connection whose response was read to the end; close it if not reusable."""
        self._active.discard(conn)
        h = conn.h11
        if self._closed or h.our_state is not h11.DONE or h.their_state is not h11.DONE:
            conn.close()
            return
        h.start_next_cycle()
        self._return_idle(conn)

    def _return_idle(self, conn: _Connection) -> None:
        """Put a connection whose exchange ended cleanly back in the idle pool (or close it)."""
        self._active.discard(conn)
        if self._closed:
            conn.close()
            return
        conn.responses += 1
        conn.got_response_bytes = False
        now = trio.current_time()
        conn.idle_since = now
        conns = self._idle.setdefault(conn.origin, deque())
        while conns and not now - conns[0].idle_since < self._expiry:  # prune the expired
            conns.popleft().close()
            self._idle_count -= 1
        if self._idle_count >= self._max_idle:
            conn.close()
            return
        conns.append(conn)
        self._idle_count += 1

    def _discard(self, conn: _Connection) -> None:
        self._active.discard(conn)
        conn.close()

    def _release_slot(self) -> None:
        self._slots.release()

    async def _connect(self, origin: _Origin, connect_timeout: float | None) -> _Connection:
        scheme, host, port = origin
        with _map_errors("connect"), _deadline(connect_timeout):
            tcp = await trio.open_tcp_stream(host, port)
            stream: trio.abc.Stream = tcp
            if scheme == "https":
                if self._ssl_context is None:
                    self._ssl_context = ssl.create_default_context()
                    self._ssl_context.set_alpn_protocols(["http/1.1"])
                tls = trio.SSLStream(
                    tcp, self._ssl_context, server_hostname=host, https_compatible=True
                )
                try:
                    await tls.do_handshake()
                except BaseException:
                    tcp.socket.close()
                    raise
                stream = tls
        self._opened += 1
        return _Connection(stream, tcp.socket, origin)

    async def _send_and_receive_head(
        self,
        conn: _Connection,
        request: httpx.Request,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None,
        timeouts: dict[str, float | None],
    ) -> h11.Response:
        h = conn.h11
        write_error: BaseException | None = None
        try:
            with _map_errors("write"), _deadline(timeouts.get("write")):
                data = h.send(
                    h11.Request(method=request.method, target=request.url.raw_path, headers=headers)
                )
                if body is not None:
                    payload = h.send(h11.Data(data=body)) if body else b""
                    payload += h.send(h11.EndOfMessage())  # b"" with Content-Length framing
                    if len(payload) <= _COALESCE_LIMIT:
                        await conn.stream.send_all(data + payload)  # one write, one segment
                    else:  # large bodies: skip the copy that joining would make
                        await conn.stream.send_all(data)
                        await conn.stream.send_all(payload)
                else:
                    await conn.stream.send_all(data)
                    async for chunk in request.stream:  # type: ignore[union-attr]
                        if chunk:
                            await conn.stream.send_all(h.send(h11.Data(data=chunk)))
                    await conn.stream.send_all(h.send(h11.EndOfMessage()))
        except httpx.WriteError as exc:
            # STYLE.md 4.6 and 4.10: mark the send failed (the connection is never reused), but
            # still read: the server may have answered early with a complete error response.
            h.send_failed()
            write_error = exc
        except BaseException:
            h.send_failed()
            raise

        read_timeout = timeouts.get("read")
        with _map_errors("read"):
            while True:
                event = h.next_event()
                if event is h11.NEED_DATA:
                    try:
                        with _deadline(read_timeout):
                            data = cast(bytes, await conn.stream.receive_some(READ_SIZE))
                    except (trio.BrokenResourceError, OSError) as exc:
                        if not conn.got_response_bytes:
                            raise _StaleConnection(
                                f"connection lost before any response byte ({exc!r})",
                                httpx.ReadError,
                            ) from exc
                        raise
                    if not data and not conn.got_response_bytes:
                        detail = f" (after a write error: {write_error})" if write_error else ""
                        raise _StaleConnection(
                            f"Server disconnected without sending a response.{detail}",
                            httpx.RemoteProtocolError,
                        )
                    conn.got_response_bytes = True
                    h.receive_data(data)
                    continue
                if isinstance(event, h11.Response):
                    return event
                if isinstance(event, h11.InformationalResponse):
                    continue  # 1xx: we never send Expect: 100-continue, skip others
                raise h11.RemoteProtocolError(
                    f"unexpected {type(event).__name__} before response head"
                )


@final
class _ResponseStream(httpx.AsyncByteStream):
    """A response body read from its connection; the end of the body returns the connection.

    ``aclose`` before the end closes the connection (a half-read response cannot be reused,
    STYLE.md 4.5). Release is synchronous, so it completes even when cancelled.
    """

    def __init__(self, pool: H11Pool, conn: _Connection, read_timeout: float | None) -> None:
        self._pool = pool
        self._conn = conn
        self._read_timeout = read_timeout
        self._done = False

    def _release(self, reusable: bool) -> None:
        if self._done:
            return
        self._done = True
        if reusable:
            self._pool._checkin(self._conn)
        else:
            self._pool._discard(self._conn)
        self._pool._release_slot()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._done:
            raise httpx.StreamClosed()
        h = self._conn.h11
        reusable = False
        try:
            with _map_errors("read"):
                while True:
                    event = h.next_event()
                    if event is h11.NEED_DATA:
                        with _deadline(self._read_timeout):
                            data = cast(bytes, await self._conn.stream.receive_some(READ_SIZE))
                        h.receive_data(data)  # b"" marks EOF; h11 decides if that is an error
                    elif isinstance(event, h11.Data):
                        yield bytes(event.data)
                    elif isinstance(event, h11.EndOfMessage):
                        reusable = True
                        return
                    else:
                        _unexpected(event)
        finally:
            self._release(reusable)

    async def aclose(self) -> None:
        self._release(False)


@final
class _DirectExchange:
    """One request and response on the direct path (:meth:`H11Pool.fetch`)."""

    __slots__ = ("conn", "read_timeout", "scope", "write_error", "writing")

    def __init__(self, conn: _Connection, read_timeout: float | None) -> None:
        self.conn = conn
        self.read_timeout = (
            None if read_timeout is None or math.isinf(read_timeout) else read_timeout
        )
        self.scope = trio.CancelScope()
        self.writing = True
        self.write_error: BaseException | None = None

    async def run(
        self,
        head: bytes,
        body: bytes | None,
        h11_request: Callable[[], h11.Request],
        write_timeout: float | None,
    ) -> tuple[Fetched, bool]:
        stream = self.conn.stream
        if write_timeout is not None and not math.isinf(write_timeout):
            self.scope.deadline = trio.current_time() + write_timeout
        try:
            if body and len(body) > _COALESCE_LIMIT:  # skip the copy that joining makes
                await stream.send_all(head)
                await stream.send_all(body)
            else:
                await stream.send_all(head + body if body else head)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            # STYLE.md 4.10: the server may have answered early with a complete error; read.
            self.write_error = exc
        self.writing = False

        buffer = bytearray()
        while True:
            data = await self.receive()
            if not data:
                raise h11.RemoteProtocolError("peer closed connection in the response head")
            buffer += data
            end = buffer.find(b"\r\n\r\n")
            if end >= 0:
                break
            if b"\n\n" in buffer or len(buffer) > MAX_HEADER_BYTES:
                end = -1  # bare LF line ends (h11 reads them) or too large (h11 says so)
                break
        parsed = None if end < 0 else parse_response_head(bytes(buffer[:end]))
        if parsed is None:
            return await self.h11_rest(h11_request(), body, bytes(buffer))
        del buffer[: end + 4]
        need = parsed.content_length
        while len(buffer) < need:
            data = await self.receive()
            if not data:
                raise h11.RemoteProtocolError(
                    f"peer closed connection without sending complete message body: "
                    f"received {len(buffer)} bytes, expected {need}"
                )
            buffer += data
        # Bytes past the body were never asked for: do not reuse a connection that has them.
        reusable = parsed.keep_alive and self.write_error is None and len(buffer) == need
        body_bytes = bytes(buffer) if len(buffer) == need else bytes(buffer[:need])
        return Fetched(parsed.status, parsed.reason, parsed.headers, body_bytes), reusable

    async def receive(self) -> bytes:
        """One read of the response; a connection that dies before any response byte raises
        `_StaleConnection` (the pool may retry a reused one)."""
        conn = self.conn
        if self.read_timeout is not None:
            self.scope.deadline = trio.current_time() + self.read_timeout
        try:
            data = cast(bytes, await conn.stream.receive_some(READ_SIZE))
        except (trio.BrokenResourceError, OSError) as exc:
            if not conn.got_response_bytes:
                raise _StaleConnection(
                    f"connection lost before any response byte ({exc!r})", httpx.ReadError
                ) from exc
            raise
        if not data and not conn.got_response_bytes:
            error = self.write_error
            detail = f" (after a write error: {error})" if error is not None else ""
            raise _StaleConnection(
                f"Server disconnected without sending a response.{detail}",
                httpx.RemoteProtocolError,
            )
        conn.got_response_bytes = True
        return data

    async def h11_rest(
        self, request: h11.Request, body: bytes | None, received: bytes
    ) -> tuple[Fetched, bool]:
        """Read the rest of an unusual response with h11, from the bytes already received.

        A fresh h11 connection is told what was sent (the bytes it produces are dropped: they
        went out already), so it frames the response exactly as it would have.
        """
        h = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
        h.send(request)
        if body:
            h.send(h11.Data(data=body))
        h.send(h11.EndOfMessage())
        if self.write_error is not None:
            h.send_failed()
        h.receive_data(received)
        response: h11.Response | None = None
        chunks: list[bytes] = []
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                h.receive_data(await self.receive())  # b"" marks EOF; h11 decides
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif not isinstance(event, h11.InformationalResponse):
                _unexpected(event)
        assert response is not None  # h11 yields Data / EndOfMessage only after a Response
        reusable = h.our_state is h11.DONE and h.their_state is h11.DONE
        headers = [(bytes(name), bytes(value)) for name, value in response.headers.raw_items()]
        fetched = Fetched(response.status_code, bytes(response.reason), headers, b"".join(chunks))
        return fetched, reusable


def _unexpected(event: object) -> NoReturn:
    raise h11.RemoteProtocolError(f"unexpected {type(event).__name__} in response body")
