"""The Transport's direct path through its own pool (issue 12 item 2), against real servers.

`Transport.request` sends whole non-GET API calls through `H11Pool.fetch`: its own request
head, `tinkex_trio._http1` for the common response head, h11 for the rest. These tests run
it over 127.0.0.1 (the scriptable fault server, or a raw socket server for malformed heads)
and assert outcomes under `trio.fail_after`, never timings. A monkeypatched
`H11Pool.handle_async_request` that fails proves a test really took the direct path.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
import trio
import trio.testing
from fault_server import FaultServer, Reply, open_fault_server

from tinkex_trio._http1 import parse_response_head
from tinkex_trio._policy import ONE_ATTEMPT
from tinkex_trio._pool import H11Pool
from tinkex_trio._transport import Transport, _DirectResponse
from tinkex_trio.config import Config
from tinkex_trio.errors import APIConnectionError, APITimeoutError, BadRequestError

LIMIT = 10.0


@pytest.fixture
async def srv() -> AsyncIterator[FaultServer]:
    async with open_fault_server() as server:
        yield server


@pytest.fixture
def no_httpx_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any request that goes through httpx into the pool: only the direct path works."""

    async def refuse(self: H11Pool, request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"{request.method} {request.url} took the httpx path")

    monkeypatch.setattr(H11Pool, "handle_async_request", refuse)


def transport_for(base_url: str, **config: object) -> Transport:
    return Transport(Config(api_key="tml-k", base_url=base_url, telemetry=False, **config))  # type: ignore[arg-type]


def pool_of(transport: Transport) -> H11Pool:
    assert transport._pool is not None
    return transport._pool


# -- the response-head parser -------------------------------------------------------------------


def test_parser_reads_the_common_shape() -> None:
    head = parse_response_head(
        b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
        b"content-length:  12 \r\nX-Odd-Name_1: a\tb"
    )
    assert head is not None
    assert head.status == 201 and head.reason == b"Created"
    assert head.headers == [
        (b"Content-Type", b"application/json"),
        (b"content-length", b"12"),
        (b"X-Odd-Name_1", b"a\tb"),
    ]
    assert head.content_length == 12 and head.keep_alive
    closing = parse_response_head(b"HTTP/1.1 200 OK\r\nConnection: Close\r\nContent-Length: 0")
    assert closing is not None and not closing.keep_alive
    assert parse_response_head(b"HTTP/1.1 200\r\nContent-Length: 1") is not None  # no reason


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked",  # chunked: h11
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain",  # close-delimited: h11
        b"HTTP/1.0 200 OK\r\nContent-Length: 1",
        b"HTTP/1.1 100 Continue\r\nContent-Length: 1",
        b"HTTP/1.1 204 No Content\r\nContent-Length: 1",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n folded",
        b"HTTP/1.1 200 OK\r\nBad Name: 1\r\nContent-Length: 1",
        b"HTTP/1.1 200 OK\r\nNo-Colon\r\nContent-Length: 1",
        b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 1",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 1",
        b"HTTP/1.1 2x0 OK\r\nContent-Length: 1",
        b"HTTP/1.1 200 O\x01K\r\nContent-Length: 1",
    ],
)
def test_parser_leaves_every_unusual_head_to_h11(head: bytes) -> None:
    assert parse_response_head(head) is None


def test_the_lean_response_is_what_httpx_builds() -> None:
    headers = [(b"Content-Type", b"application/json"), (b"Content-Length", b"9")]
    ours = _DirectResponse._read(200, headers, b'{"a": 1}\n')
    theirs = httpx.Response(200, headers=headers, content=b'{"a": 1}\n')
    # Every attribute httpx sets, but the content decoder it makes lazily when needed.
    assert set(vars(theirs)) - set(vars(ours)) == {"_decoder"}
    assert set(vars(ours)) <= set(vars(theirs))
    for name in ("status_code", "headers", "is_closed", "is_stream_consumed", "content", "text"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.json() == {"a": 1} and ours.is_success
    assert ours._num_bytes_downloaded == 9
    with pytest.raises(RuntimeError):
        ours.raise_for_status()  # no request until one is made for it


# -- over sockets -------------------------------------------------------------------------------


async def test_keep_alive_headers_and_key_on_the_direct_path(
    srv: FaultServer, no_httpx_path: None
) -> None:
    srv.always("POST", "/api/v1/echo", Reply.json({"ok": True}))
    with trio.fail_after(LIMIT):
        transport = transport_for(srv.base_url)
        try:
            for i in range(5):
                response = await transport.request("POST", "/api/v1/echo", content=b"x" * i)
                assert response.json() == {"ok": True}
            stats = pool_of(transport).statistics()
        finally:
            await transport.aclose()
    assert srv.connections_accepted == 1
    assert stats.requests_on_reused_connections == 4 and stats.idle_connections == 1
    sent = srv.requests_to("/api/v1/echo")
    assert [r.body for r in sent] == [b"x" * i for i in range(5)]
    first = sent[0].headers
    assert first["host"] == srv.base_url.removeprefix("http://")
    assert first["x-api-key"] == "tml-k"
    assert first["content-type"] == "application/json" and first["accept"] == "application/json"
    assert first["content-length"] == "0" and first["x-stainless-retry-count"] == "0"
    assert first["user-agent"].startswith("tinkex-trio/")
    assert first["connection"] == "keep-alive" and "gzip" in first["accept-encoding"]
    keys = [r.headers["x-idempotency-key"] for r in sent]
    assert len(set(keys)) == 5 and all(k.startswith("tinkex-trio-retry-") for k in keys)


async def test_chunked_and_close_delimited_bodies_go_to_h11_and_keep_alive_survives(
    srv: FaultServer, no_httpx_path: None
) -> None:
    srv.script(
        "POST",
        "/api/v1/x",
        Reply(body=b'{"chunked": true}', chunked=True),
        Reply(body=b'{"chunked": "again"}', chunked=True),
    )
    with trio.fail_after(LIMIT):
        transport = transport_for(srv.base_url)
        try:
            first = await transport.request("POST", "/api/v1/x", content=b"{}")
            second = await transport.request("POST", "/api/v1/x", content=b"{}")
        finally:
            await transport.aclose()
    assert first.json() == {"chunked": True} and second.json() == {"chunked": "again"}
    assert srv.connections_accepted == 1  # h11 read the chunked body to its end: reused


async def test_connection_close_and_a_server_closing_idle_connections(
    srv: FaultServer, no_httpx_path: None
) -> None:
    srv.script("POST", "/api/v1/x", Reply.json({"n": 1}, close=True))
    srv.always("POST", "/api/v1/x", Reply.json({"n": 2}))
    with trio.fail_after(LIMIT):
        transport = transport_for(srv.base_url)
        try:
            assert (await transport.request("POST", "/api/v1/x", content=b"{}")).json() == {"n": 1}
            assert (await transport.request("POST", "/api/v1/x", content=b"{}")).json() == {"n": 2}
            assert srv.connections_accepted == 2  # Connection: close was honoured
            await srv.close_idle_connections()
            # The idle socket is readable (EOF) now: the pool notices and connects anew.
            assert (await transport.request("POST", "/api/v1/x", content=b"{}")).json() == {"n": 2}
        finally:
            await transport.aclose()
    assert srv.connections_accepted == 3


async def test_a_reused_connection_dropped_before_the_answer_is_retried_once_on_a_fresh_one(
    srv: FaultServer, no_httpx_path: None
) -> None:
    srv.script(
        "POST",
        "/api/v1/x",
        Reply.json({"n": 1}),
        Reply.drop_connection(),
        Reply.json({"n": 2}),
        Reply.drop_connection(),
        Reply.drop_connection(),
    )
    with trio.fail_after(LIMIT):
        transport = transport_for(srv.base_url)
        try:
            assert (await transport.request("POST", "/api/v1/x", content=b"a")).json() == {"n": 1}
            # Dropped on the reused connection: sent once more, on a new connection.
            answer = await transport.request("POST", "/api/v1/x", content=b"b", policy=ONE_ATTEMPT)
            assert answer.json() == {"n": 2}
            assert pool_of(transport).statistics().stale_retries == 1
            # Dropped again on reuse, then on the fresh connection: only one retry.
            with pytest.raises(APIConnectionError):
                await transport.request("POST", "/api/v1/x", content=b"c", policy=ONE_ATTEMPT)
            stats = pool_of(transport).statistics()
        finally:
            await transport.aclose()
    assert [(r.body, r.connection_id) for r in srv.requests] == [
        (b"a", 0),
        (b"b", 0),
        (b"b", 1),
        (b"c", 1),
        (b"c", 2),
    ]
    assert stats.stale_retries == 2 and stats.active_connections == 0


async def test_a_drop_mid_body_is_a_connection_error_and_closes_the_connection(
    srv: FaultServer, no_httpx_path: None
) -> None:
    srv.script("POST", "/api/v1/x", Reply(body=b'{"long": "body"}', drop="mid_body"))
    with trio.fail_after(LIMIT):
        transport = transport_for(srv.base_url)
        try:
            with pytest.raises(APIConnectionError) as caught:
                await transport.request("POST", "/api/v1/x", content=b"{}", policy=ONE_ATTEMPT)
            stats = pool_of(transport).statistics()
        finally:
            await transport.aclose()
    assert isinstance(caught.value.__cause__, httpx.RemoteProtocolError)
    assert "expected 16" in str(caught.value.__cause__)
    assert stats.idle_connections == 0 and stats.active_connections == 0


async def test_an_error_answer_is_read_once_and_raised(
    srv: FaultServer, no_httpx_path: None
) -> None:
    srv.script("POST", "/api/v1/x", Reply.json({"detail": "no"}, status=400))
    with trio.fail_after(LIMIT):
        transport = transport_for(srv.base_url)
        try:
            with pytest.raises(BadRequestError) as caught:
                await transport.request("POST", "/api/v1/x", content=b'{"q": 1}')
        finally:
            await transport.aclose()
    # The request is built for the error only, without the key.
    request = caught.value.request
    assert request is not None and request.url.path == "/api/v1/x"
    assert request.content == b'{"q": 1}' and "x-api-key" not in request.headers


async def test_a_redirect_answer_is_sent_again_through_httpx_which_follows_it(
    srv: FaultServer,
) -> None:
    srv.script("POST", "/api/v1/old", Reply(status=307, headers={"Location": "/api/v1/new"}))
    srv.script("POST", "/api/v1/old", Reply(status=307, headers={"Location": "/api/v1/new"}))
    srv.always("POST", "/api/v1/new", Reply.json({"moved": True}))
    with trio.fail_after(LIMIT):
        transport = transport_for(srv.base_url)
        try:
            response = await transport.request("POST", "/api/v1/old", content=b"{}")
        finally:
            await transport.aclose()
    assert response.json() == {"moved": True}
    assert [r.path for r in srv.requests] == ["/api/v1/old", "/api/v1/old", "/api/v1/new"]
    assert srv.requests[-1].body == b"{}"  # 307 keeps the method and the body


async def test_cancelled_mid_request_closes_the_connection_and_frees_the_slot(
    srv: FaultServer, no_httpx_path: None
) -> None:
    srv.script("POST", "/api/v1/x", Reply.hang())
    srv.always("POST", "/api/v1/x", Reply.json({"ok": True}))
    with trio.fail_after(LIMIT):
        transport = transport_for(srv.base_url)
        pool = pool_of(transport)
        try:
            with trio.move_on_after(0.2) as scope:
                await transport.request("POST", "/api/v1/x", content=b"{}")
            assert scope.cancelled_caught
            stats = pool.statistics()
            assert stats.active_connections == 0 and stats.idle_connections == 0
            assert pool._slots.value == pool._max_connections
            ok = await transport.request("POST", "/api/v1/x", content=b"{}")
        finally:
            await transport.aclose()
    assert ok.json() == {"ok": True}
    assert srv.connections_accepted == 2


async def test_a_read_timeout_is_an_api_timeout(srv: FaultServer, no_httpx_path: None) -> None:
    srv.always("POST", "/api/v1/x", Reply.hang())
    with trio.fail_after(LIMIT):
        transport = transport_for(srv.base_url, timeout=0.3)
        try:
            with pytest.raises(APITimeoutError) as caught:
                await transport.request("POST", "/api/v1/x", content=b"{}", policy=ONE_ATTEMPT)
        finally:
            await transport.aclose()
    assert isinstance(caught.value.__cause__, httpx.ReadTimeout)


# -- malformed heads, from a raw socket server ---------------------------------------------------


async def _raw_server(
    nursery: trio.Nursery, answer: Callable[[trio.SocketStream], Awaitable[None]]
) -> str:
    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(65536)
            await answer(stream)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Le", "in the response head"),
        (b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", "illegal header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", "expected 5"),
        (b"garbage\r\n\r\n", "illegal status line"),
    ],
)
async def test_errors_mid_head_are_protocol_errors(raw: bytes, message: str) -> None:
    async def answer(stream: trio.SocketStream) -> None:
        await stream.send_all(raw)

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            base_url = await _raw_server(nursery, answer)
            transport = transport_for(base_url)
            try:
                with pytest.raises(APIConnectionError) as caught:
                    await transport.request("POST", "/x", content=b"{}", policy=ONE_ATTEMPT)
            finally:
                await transport.aclose()
            nursery.cancel_scope.cancel()
    assert isinstance(caught.value.__cause__, httpx.RemoteProtocolError)
    assert message in str(caught.value.__cause__)


async def test_bare_lf_heads_and_1xx_are_read_by_h11() -> None:
    async def answer(stream: trio.SocketStream) -> None:
        await stream.send_all(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            b"HTTP/1.1 200 OK\nContent-Length: 2\nX-A: b\n\nok"
        )

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            base_url = await _raw_server(nursery, answer)
            transport = transport_for(base_url)
            try:
                response = await transport.request("POST", "/x", content=b"{}")
            finally:
                await transport.aclose()
            nursery.cancel_scope.cancel()
    assert response.status_code == 200 and response.content == b"ok"
    assert response.headers["x-a"] == "b"


async def test_transfer_encoding_wins_over_content_length() -> None:
    """RFC 9112 6.3: with both, the body is chunked; the fast parser must not read it by
    Content-Length (h11 frames it, and the connection is not reused after such a head)."""

    async def answer(stream: trio.SocketStream) -> None:
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n3\r\n!!!\r\n0\r\n\r\n"
        )

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            base_url = await _raw_server(nursery, answer)
            transport = transport_for(base_url)
            try:
                response = await transport.request("POST", "/x", content=b"{}")
            finally:
                await transport.aclose()
            nursery.cancel_scope.cancel()
    assert response.content == b"ok!!!"


async def test_a_429_on_the_direct_path_opens_the_window_and_resends_the_same_bytes(
    no_httpx_path: None,
) -> None:
    """A sample's submit answered 429 over real sockets: the shared window opens, the very
    same body (same seq_id) goes out again once it closes, and telemetry saw both attempts."""
    from fake_tinker import FakeTinker

    from tinkex_trio import ModelInput, open_service
    from tinkex_trio.telemetry import RequestFinished

    fake = FakeTinker()
    events: list[RequestFinished] = []
    with trio.fail_after(LIMIT):
        async with open_fault_server(fake.fault_handler) as server:
            server.script(
                "POST", "/api/v1/asample", Reply.json({"detail": "slow down"}, status=429)
            )
            config = Config(api_key=fake.api_key, base_url=server.base_url, telemetry=False)
            async with open_service(config) as service:
                sampler = await service.create_sampling_client(base_model="fake/model")
                service.telemetry.add_handler(
                    lambda e: events.append(e) if isinstance(e, RequestFinished) else None
                )
                response = await sampler.sample(ModelInput.from_ints([7]))
                limiter = service._ctx.rate_limiter.statistics()
            submits = server.requests_to("/api/v1/asample")
    assert response.sequences[0].tokens
    assert limiter.rate_limited_total == 1 and limiter.in_flight == 0
    assert len(submits) == 2 and submits[0].body == submits[1].body
    # A rebuilt request (after the window): a new idempotency key, the same bytes.
    assert submits[0].headers["x-idempotency-key"] != submits[1].headers["x-idempotency-key"]
    statuses = [(e.path, e.status) for e in events]
    assert statuses[:2] == [("/api/v1/asample", 429), ("/api/v1/asample", 200)]
