"""A scriptable HTTP/1.1 server for tests: status codes, delays, dropped connections, records.

Synopsis::

    from fault_server import Reply, open_fault_server   # tests/ is on sys.path under pytest

    async with open_fault_server() as srv:          # 127.0.0.1, port 0
        srv.script("POST", "/api/v1/asample",       # rows are used once each, in order
                   Reply(status=503),
                   Reply.drop_connection("before_response"),
                   Reply.json({"request_id": "r1"}))
        srv.always("GET", "/api/v1/healthz", Reply.json({"status": "ok"}))
        ...  # point the client at srv.base_url
        assert [r.path for r in srv.requests] == [...]

    # or, inside a nursery:  srv = await nursery.start(serve_fault_server)

Scripts are rows of (method, path, action), like open_tcp_stream's (ip, delay, result) rows
(STYLE.md 2.14). For each request the server takes the first matching row that still has uses
left (``script`` rows have one use each; ``always`` rows never run out); ``method`` may be ``"*"``
and ``path`` is an ``fnmatch`` pattern matched against the path without the query string.
Unscripted requests go to ``handler`` (a sync or async function of :class:`RecordedRequest`
returning a :class:`Reply`); the default handler answers 404 with a JSON ``detail``.

An action (:class:`Reply`) is a status, body and headers, plus optional faults:

- ``delay``: seconds to wait before the response head (``math.inf`` hangs until the client leaves);
- ``drop="before_response"``: close the connection without answering;
- ``drop="reset"``: abort with a TCP RST instead (SO_LINGER 0);
- ``drop="after_headers"`` / ``drop="mid_body"``: send the head (and half the body), then close;
- ``close=True``: answer with ``Connection: close`` and close afterwards;
- ``chunked=True``: send the body with ``Transfer-Encoding: chunked``;
- ``body_delay``: seconds to wait between the first and second half of the body.

Everything is recorded: ``srv.requests`` (method, path, query, headers, body, connection id) and
``srv.connections_accepted``; ``await srv.close_idle_connections()`` closes every keep-alive
connection that is waiting for its next request (to make a client's pooled connection stale).

HTTPS: pass a server-side ``ssl_context`` (e.g. from a self-signed certificate made with the
``openssl`` CLI, as tests/test_pool.py does) and ``base_url`` becomes ``https://127.0.0.1:<port>``.

Rules for tests using it: real sockets, so no ``autojump_clock`` (its jumps would fire while
bytes are in flight); bound every test with ``trio.fail_after`` and assert outcomes, not timings.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import inspect
import itertools
import json
import math
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Literal, NoReturn

import h11
import trio
import trio.testing

__all__ = ["FaultServer", "RecordedRequest", "Reply", "open_fault_server", "serve_fault_server"]

Drop = Literal["before_response", "reset", "after_headers", "mid_body"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Reply:
    """One scripted action: the response to send and the fault to inject."""

    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    delay: float = 0.0
    drop: Drop | None = None
    close: bool = False
    chunked: bool = False
    body_delay: float = 0.0

    @classmethod
    def json(
        cls,
        obj: object,
        status: int = 200,
        *,
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
        drop: Drop | None = None,
        close: bool = False,
    ) -> Reply:
        """A JSON body with ``Content-Type: application/json``."""
        return cls(
            status=status,
            body=json.dumps(obj).encode(),
            headers={"Content-Type": "application/json", **(headers or {})},
            delay=delay,
            drop=drop,
            close=close,
        )

    @classmethod
    def drop_connection(cls, how: Drop = "before_response", *, delay: float = 0.0) -> Reply:
        """Fail the connection (see the module docstring for ``how``)."""
        return cls(drop=how, delay=delay)

    @classmethod
    def hang(cls) -> Reply:
        """Never answer (until the client closes the connection)."""
        return cls(delay=math.inf)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecordedRequest:
    """A request as the server received it. Header names are lower-cased."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    connection_id: int

    def json(self) -> object:
        return json.loads(self.body)


@dataclasses.dataclass
class _Row:
    method: str
    path: str
    reply: Reply
    uses_left: int | None  # None: forever


Handler = Callable[[RecordedRequest], "Reply | Awaitable[Reply]"]


def _not_scripted(request: RecordedRequest) -> Reply:
    return Reply.json({"detail": f"no script for {request.method} {request.path}"}, status=404)


@dataclasses.dataclass
class _Conn:
    stream: trio.abc.Stream  # the SocketStream, or an SSLStream over it
    socket: trio.socket.SocketType
    idle: bool = True


class FaultServer:
    """The running server (from :func:`open_fault_server` or ``nursery.start(serve_fault_server)``)."""

    def __init__(
        self, port: int, handler: Handler, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self.port = port
        self.base_url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
        self._ssl_context = ssl_context
        self.handler = handler
        self.requests: list[RecordedRequest] = []
        self.connections_accepted = 0
        self._rows: list[_Row] = []
        self._conns: dict[int, _Conn] = {}
        self._ids = itertools.count()

    # -- scripting -----------------------------------------------------------------------------

    def script(self, method: str, path: str, *replies: Reply) -> None:
        """Append one single-use row per reply, used in the given order."""
        for reply in replies:
            self._rows.append(_Row(method.upper(), path, reply, 1))

    def always(self, method: str, path: str, reply: Reply) -> None:
        """Append a row that never runs out (rows before it still win while they last)."""
        self._rows.append(_Row(method.upper(), path, reply, None))

    def clear(self) -> None:
        """Forget the script and the recorded requests."""
        self._rows.clear()
        self.requests.clear()

    def requests_to(self, path: str, method: str = "*") -> list[RecordedRequest]:
        return [r for r in self.requests if _matches(method, path, r)]

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    async def close_idle_connections(self) -> int:
        """Close every connection waiting for its next request; returns how many.

        First waits until every task is blocked, so connections that just sent a response have
        become idle (the client may see the response before the server task loops around).
        """
        await trio.testing.wait_all_tasks_blocked()
        closed = 0
        for conn in list(self._conns.values()):
            if conn.idle:
                conn.socket.close()
                closed += 1
        return closed

    async def _choose(self, request: RecordedRequest) -> Reply:
        for row in self._rows:
            if row.uses_left != 0 and _matches(row.method, row.path, request):
                if row.uses_left is not None:
                    row.uses_left -= 1
                return row.reply
        result = self.handler(request)
        if inspect.isawaitable(result):
            result = await result
        return result

    # -- serving -------------------------------------------------------------------------------

    async def _handle(self, tcp: trio.SocketStream) -> None:
        conn_id = next(self._ids)
        self.connections_accepted += 1
        stream: trio.abc.Stream = tcp
        conn = _Conn(stream, tcp.socket)
        self._conns[conn_id] = conn
        try:
            if self._ssl_context is not None:
                conn.stream = stream = trio.SSLStream(
                    tcp, self._ssl_context, server_side=True, https_compatible=True
                )
                await stream.do_handshake()
            await self._serve(conn, conn_id)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError, _Dropped):
            pass  # the client left, or a scripted fault: close
        finally:
            del self._conns[conn_id]
            await trio.aclose_forcefully(stream)

    async def _serve(self, conn: _Conn, conn_id: int) -> None:
        h = h11.Connection(h11.SERVER)
        stream = conn.stream
        while True:
            conn.idle = True
            event = await _next_event(h, stream)
            conn.idle = False
            if isinstance(event, h11.ConnectionClosed):
                return
            assert isinstance(event, h11.Request), event
            body = bytearray()
            while True:
                part = await _next_event(h, stream)
                if isinstance(part, h11.Data):
                    body += part.data
                elif isinstance(part, h11.EndOfMessage):
                    break
                else:
                    return
            target = event.target.decode()
            path, _, query = target.partition("?")
            recorded = RecordedRequest(
                method=event.method.decode(),
                path=path,
                query=query,
                headers={k.decode(): v.decode() for k, v in event.headers},
                body=bytes(body),
                connection_id=conn_id,
            )
            self.requests.append(recorded)
            reply = await self._choose(recorded)
            await self._respond(h, conn, reply)
            if h.our_state is not h11.DONE or h.their_state is not h11.DONE:
                return  # Connection: close from either side
            h.start_next_cycle()

    async def _respond(self, h: h11.Connection, conn: _Conn, reply: Reply) -> None:
        stream = conn.stream
        if reply.delay:
            await _sleep_watching(h, stream, reply.delay)
        if reply.drop == "before_response":
            _drop()
        if reply.drop == "reset":
            conn.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.socket.close()
            _drop()
        headers = [(k.encode(), v.encode()) for k, v in reply.headers.items()]
        names = {k.lower() for k, _ in headers}
        if reply.chunked:
            headers.append((b"Transfer-Encoding", b"chunked"))
        elif b"content-length" not in names:
            headers.append((b"Content-Length", str(len(reply.body)).encode()))
        if reply.close:
            headers.append((b"Connection", b"close"))
        await stream.send_all(h.send(h11.Response(status_code=reply.status, headers=headers)))
        if reply.drop == "after_headers":
            _drop()
        half = len(reply.body) // 2
        first, second = reply.body[:half], reply.body[half:]
        if first:
            await stream.send_all(h.send(h11.Data(data=first)))
        if reply.drop == "mid_body":
            _drop()
        if reply.body_delay:
            await _sleep_watching(h, stream, reply.body_delay)
        if second:
            await stream.send_all(h.send(h11.Data(data=second)))
        await stream.send_all(h.send(h11.EndOfMessage()))


class _Dropped(Exception):
    pass


def _drop() -> NoReturn:
    raise _Dropped


async def _sleep_watching(h: h11.Connection, stream: trio.abc.Stream, seconds: float) -> None:
    """Sleep, but notice the client closing meanwhile (then drop, as a real server would)."""
    deadline = trio.current_time() + seconds
    while True:
        with trio.move_on_at(deadline):
            data = await stream.receive_some(65536)
            if not data:
                _drop()
            h.receive_data(bytes(data))  # unexpected early bytes: keep them for h11
            continue
        return


def _matches(method: str, pattern: str, request: RecordedRequest) -> bool:
    return (method in ("*", request.method)) and fnmatch.fnmatchcase(request.path, pattern)


async def _next_event(h: h11.Connection, stream: trio.abc.Stream) -> object:
    while True:
        event = h.next_event()
        if event is h11.NEED_DATA:
            if h.they_are_waiting_for_100_continue:
                await stream.send_all(
                    h.send(h11.InformationalResponse(status_code=100, headers=[]))
                )
            h.receive_data(bytes(await stream.receive_some(65536)))
            continue
        if event is h11.PAUSED:
            raise h11.RemoteProtocolError("pipelined request")
        return event


async def serve_fault_server(
    *,
    handler: Handler = _not_scripted,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[FaultServer] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve on 127.0.0.1, port 0, until cancelled; ``task_status.started(server)``.

    With ``ssl_context`` (a server-side context) it speaks HTTPS and ``base_url`` is https.
    """
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=1024)
    port = listeners[0].socket.getsockname()[1]
    server = FaultServer(port, handler, ssl_context)
    async with trio.open_nursery() as nursery:
        task_status.started(server)
        await trio.serve_listeners(server._handle, listeners, handler_nursery=nursery)
    raise AssertionError("unreachable")


@asynccontextmanager
async def open_fault_server(
    handler: Handler = _not_scripted, *, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[FaultServer]:
    """Run a :class:`FaultServer` for the duration of the block."""
    async with trio.open_nursery() as nursery:
        server: FaultServer = await nursery.start(
            functools.partial(serve_fault_server, handler=handler, ssl_context=ssl_context)
        )
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel(reason="fault server block exited")
