"""A small ASGI layer: request/response objects, a regex router, and error bodies.

Written here rather than taken from a framework because the backend needs very little (JSON in,
JSON out, one streamed download) and must control details a framework hides: every error is a
non-empty JSON body with a Content-Length (PROTOCOL.md 1.6: a bodiless 400 is taken for a proxy
reset), paths carry raw colons and a slash inside checkpoint ids (PROTOCOL.md 1.2, 10.12), and
nothing may turn into a 500 without a body.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import msgspec
import trio

from tinkex_trio import types as t

if TYPE_CHECKING:
    # What trio.open_file returns; trio exports no public name for the class.
    from trio._file_io import AsyncIOWrapper

logger = logging.getLogger("tinkex_trio.local.http")

#: Chunk size for streaming a file (archives, exported files): constant memory per download.
STREAM_CHUNK = 64 * 1024
#: The `retry-after` (seconds) of a 503 for a full body budget: bodies in flight are read at
#: loopback speed, so the budget frees within a second or two.
BODY_BUDGET_RETRY_AFTER = 1

Scope = Mapping[str, Any]
Message = Mapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class HTTPError(Exception):
    """Raised by handlers; becomes a JSON error response `{"detail", "category"}`."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        category: str = "user",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.category = category
        self.headers = dict(headers or {})


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes
    params: dict[str, str] = field(default_factory=dict)
    scheme: str = "http"
    server: tuple[str, int] | None = None

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def base_url(self) -> str:
        """The absolute base URL this request reached (for absolute `Location` headers)."""
        host = self.header("host")
        if host is None and self.server is not None:
            host = f"{self.server[0]}:{self.server[1]}"
        return f"{self.scheme}://{host or '127.0.0.1'}"


@dataclass
class Response:
    status: int = 200
    body: bytes = b"{}"
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class StreamResponse:
    status: int
    chunks: AsyncIterator[bytes]
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


class _ErrorBody(msgspec.Struct):
    """The body of every 4xx/5xx answer. Clients keep error bodies as they come (PROTOCOL.md
    7.10: no shape is required); `detail` is the FastAPI-style key the official CLI reads."""

    detail: str
    category: str


def int_query(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    """Query parameter `name` as an int in `lo..hi` (`default` if absent); 400 otherwise."""
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise HTTPError(400, f"query parameter {name}={raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise HTTPError(400, f"query parameter {name}={value} must be in {lo}..{hi}")
    return value


def json_response(
    obj: t.Response, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """A JSON answer encoded from a wire Struct, the same Structs the SDK decodes (typed so
    that a hand-built dict cannot be sent)."""
    return Response(status=status, body=t.encode(obj), headers=dict(headers or {}))


def file_response(
    handle: AsyncIOWrapper[Any], content_type: str, headers: Mapping[str, str] | None = None
) -> StreamResponse:
    """Stream an open file in `STREAM_CHUNK` pieces (constant memory); closes it when done."""
    size = os.fstat(handle.fileno()).st_size

    async def chunks() -> AsyncIterator[bytes]:
        async with handle:
            while chunk := await handle.read(STREAM_CHUNK):
                yield chunk

    return StreamResponse(
        status=200,
        chunks=chunks(),
        content_type=content_type,
        headers={"content-length": str(size), **(headers or {})},
    )


def error_response(exc: HTTPError) -> Response:
    body = msgspec.json.encode(_ErrorBody(detail=exc.detail, category=exc.category))
    return Response(status=exc.status, body=body, headers=exc.headers)


Handler = Callable[[Request], Awaitable[Response | StreamResponse]]


@dataclass
class _Route:
    method: str
    pattern: re.Pattern[str]
    handler: Handler


class Router:
    """Routes by method and a full-match regex; named groups become `request.params`."""

    def __init__(self) -> None:
        self._routes: list[_Route] = []

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        self._routes.append(_Route(method, re.compile(pattern), handler))

    def resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        allowed: list[str] = []
        for route in self._routes:
            m = route.pattern.fullmatch(path)
            if m is None:
                continue
            if route.method != method:
                allowed.append(route.method)
                continue
            return route.handler, m.groupdict()
        if allowed:
            raise HTTPError(
                405,
                f"method {method} not allowed on {path}; use {', '.join(sorted(set(allowed)))}",
                headers={"allow": ", ".join(sorted(set(allowed)))},
            )
        raise HTTPError(404, f"no endpoint {method} {path}")


class BodyBudget:
    """The request-body bytes all requests together may hold while being read.

    A request reserves its declared `Content-Length` before reading a byte (or, without one,
    each piece as it arrives) and gives it back when its handling ends. A reservation that
    would pass the budget is answered 503 with `retry-after`, so memory held by bodies is
    bounded by configuration whatever the number of clients.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0

    def reserve(self, size: int) -> None:
        if self.in_use + size > self.limit:
            raise HTTPError(
                503,
                f"the local backend is reading {self.in_use} bytes of request bodies (limit "
                f"{self.limit}); retry shortly",
                category="server",
                headers={"retry-after": str(BODY_BUDGET_RETRY_AFTER)},
            )
        self.in_use += size

    def release(self, size: int) -> None:
        self.in_use -= size


def request_head(scope: Scope) -> Request:
    """The request without its body: what routing and authentication need."""
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", []):
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    query = {
        k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()
    }
    server = scope.get("server")
    return Request(
        method=scope["method"],
        path=scope["path"],
        query=query,
        headers=headers,
        body=b"",
        scheme=scope.get("scheme", "http"),
        server=(server[0], server[1]) if server else None,
    )


async def read_body(
    request: Request,
    receive: Receive,
    *,
    max_size: int,
    budget: BodyBudget,
    read_timeout: float,
) -> int:
    """Read the body into `request.body`; return the bytes reserved from `budget`, which the
    caller gives back once the request is handled (also when this raises: then 0 is owed).

    Raises:
        HTTPError: 413 if the body (declared or read) is larger than `max_size`; 503 if the
            budget is spent; 408 if the client stalls more than `read_timeout` seconds
            between pieces; 400 if it disconnects before the body is complete.
    """
    declared = _content_length(request)
    if declared is not None and declared > max_size:
        raise HTTPError(413, f"request body of {declared} bytes is larger than {max_size} bytes")
    reserved = 0
    try:
        if declared is not None:
            budget.reserve(declared)
            reserved = declared
        chunks: list[bytes] = []
        size = 0
        while True:
            with trio.move_on_after(read_timeout) as waiting:
                message = await receive()
            if waiting.cancelled_caught:
                raise HTTPError(
                    408, f"the request body stalled for {read_timeout:g} s; send it whole"
                )
            if message["type"] == "http.disconnect":
                raise HTTPError(400, "the client disconnected before the request body ended")
            body = message.get("body", b"")
            size += len(body)
            if size > max_size:
                raise HTTPError(413, f"request body larger than {max_size} bytes")
            if size > reserved:
                budget.reserve(size - reserved)
                reserved = size
            chunks.append(body)
            if not message.get("more_body", False):
                break
    except BaseException:
        budget.release(reserved)
        raise
    request.body = b"".join(chunks)
    return reserved


def _content_length(request: Request) -> int | None:
    raw = request.header("content-length")
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise HTTPError(400, f"Content-Length {raw[:40]!r} is not a number") from None
    if value < 0:
        raise HTTPError(400, f"Content-Length {value} is negative")
    return value


async def send_response(send: Send, response: Response | StreamResponse) -> None:
    headers = [(b"content-type", response.content_type.encode())]
    headers += [(k.lower().encode(), v.encode("latin-1")) for k, v in response.headers.items()]
    if isinstance(response, Response):
        headers.append((b"content-length", str(len(response.body)).encode()))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})
        return
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    async for chunk in response.chunks:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def handle_lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge Hypercorn's lifespan protocol; the backend's tasks live elsewhere."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
