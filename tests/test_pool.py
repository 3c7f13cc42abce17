"""H11Pool against real sockets (the fault server on 127.0.0.1, port 0).

Rules: real I/O, so no autojump clock; every test is bounded by `trio.fail_after` and asserts
outcomes (status, error type, connection counts), never timings.
"""

from __future__ import annotations

import gzip
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
import trio
from fault_server import FaultServer, Reply, open_fault_server

from tinkex_trio._pool import H11Pool
from tinkex_trio._transport import Transport
from tinkex_trio.config import Config
from tinkex_trio.errors import APIConnectionError, InternalServerError

LIMIT = 10.0  # seconds of trio time for any single test


@pytest.fixture
async def srv() -> AsyncIterator[FaultServer]:
    async with open_fault_server() as server:
        yield server


@pytest.fixture
async def pool() -> AsyncIterator[H11Pool]:
    p = H11Pool()
    yield p
    await p.aclose()


def client(srv: FaultServer, pool: H11Pool, **kwargs: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=pool, base_url=srv.base_url, **kwargs)  # type: ignore[arg-type]


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Poll a condition on the server's side (it changes from another task's socket I/O)."""
    with trio.fail_after(5):
        while not predicate():  # noqa: ASYNC110 - no event to wait on: the state is the kernel's
            await trio.sleep(0.01)


async def test_keep_alive_reuses_one_connection(srv: FaultServer, pool: H11Pool) -> None:
    srv.always("*", "/echo", Reply.json({"ok": True}))
    with trio.fail_after(LIMIT):
        async with client(srv, pool) as c:
            for i in range(10):
                r = await c.post("/echo", content=b"x" * i)
                assert r.json() == {"ok": True}
            await c.get("/echo")
    assert srv.connections_accepted == 1
    stats = pool.statistics()
    assert (
        stats.connections_opened,
        stats.requests_sent,
        stats.requests_on_reused_connections,
    ) == (1, 11, 10)
    assert [len(r.body) for r in srv.requests[:10]] == list(range(10))
    assert srv.requests[0].headers["content-length"] == "0"  # an empty POST body is still framed


async def test_statistics_idle_and_active(srv: FaultServer, pool: H11Pool) -> None:
    srv.always("GET", "/slow", Reply(body=b"abcdef", body_delay=0.2))
    with trio.fail_after(LIMIT):
        async with client(srv, pool) as c:
            async with c.stream("GET", "/slow") as r:
                assert pool.statistics().active_connections == 1
                assert await r.aread() == b"abcdef"
            s = pool.statistics()
            assert (s.active_connections, s.idle_connections) == (0, 1)


async def test_stale_idle_connection_is_detected_before_reuse(
    srv: FaultServer, pool: H11Pool
) -> None:
    srv.always("GET", "/", Reply(body=b"hi"))
    with trio.fail_after(LIMIT):
        async with client(srv, pool) as c:
            await c.get("/")
            assert await srv.close_idle_connections() == 1
            await wait_until(lambda: srv.open_connections == 0, "server closed")
            await trio.sleep(0.05)  # let the FIN arrive
            assert (await c.get("/")).content == b"hi"
    s = pool.statistics()
    assert (s.connections_opened, s.stale_retries) == (2, 0)


async def test_reused_connection_dropped_before_response_is_retried_once(
    srv: FaultServer, pool: H11Pool
) -> None:
    srv.script(
        "POST", "/submit", Reply(body=b"first"), Reply.drop_connection(), Reply(body=b"second")
    )
    with trio.fail_after(LIMIT):
        async with client(srv, pool) as c:
            assert (await c.post("/submit", content=b"a")).content == b"first"
            assert (await c.post("/submit", content=b"b")).content == b"second"
    assert [(r.body, r.connection_id) for r in srv.requests] == [(b"a", 0), (b"b", 0), (b"b", 1)]
    assert pool.statistics().stale_retries == 1


async def test_reused_connection_is_retried_only_once(srv: FaultServer, pool: H11Pool) -> None:
    srv.script("GET", "/", Reply(body=b"ok"), Reply.drop_connection(), Reply.drop_connection())
    with trio.fail_after(LIMIT):
        async with client(srv, pool) as c:
            await c.get("/")
            with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
                await c.get("/")
    assert len(srv.requests) == 3 and pool.statistics().stale_retries == 1


async def test_fresh_connection_drop_is_not_retried(srv: FaultServer, pool: H11Pool) -> None:
    srv.script("POST", "/x", Reply.drop_connection(), Reply(body=b"never"))
    with trio.fail_after(LIMIT):
        async with client(srv, pool) as c:
            with pytest.raises(httpx.RemoteProtocolError):
                await c.post("/x", content=b"{}")
    assert len(srv.requests) == 1
    assert pool.statistics().active_connections == 0


async def test_reset_before_response_is_a_read_error(srv: FaultServer, pool: H11Pool) -> None:
    srv.script("GET", "/x", Reply.drop_connection("reset"))
    with trio.fail_after(LIMIT):
        async with client(srv, pool) as c:
            with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
                await c.get("/x")


@pytest.mark.parametrize("how", ["mid_body", "after_headers"])
async def test_drop_mid_body(srv: FaultServer, pool: H11Pool, how: str) -> None:
    srv.script("GET", "/big", Reply(body=b"x" * 100_000, drop=how))  # type: ignore[arg-type]
    srv.always("GET", "/ok", Reply(body=b"fine"))
    with trio.fail_after(LIMIT):
        async with client(srv, pool) as c:
            with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
                await c.get("/big")
            assert pool.statistics().active_connections == 0
            assert (await c.get("/ok")).content == b"fine"
    assert pool.statistics().connections_opened == 2


async def test_server_connection_close_is_honoured(srv: FaultServer, pool: H11Pool) -> None:
    srv.script("GET", "/", Reply(body=b"1", close=True), Reply(body=b"2"), Reply(body=b"3"))
    with trio.fail_after(LIMIT):
        async with client(srv, pool) as c:
            assert (await c.get("/")).content == b"1"
            assert pool.statistics().idle_connections == 0
            assert (await c.get("/")).content == b"2"
            assert (await c.get("/")).content == b"3"
    assert [r.connection_id for r in srv.requests] == [0, 1, 1]


async def test_client_connection_close_is_honoured(srv: FaultServer, pool: H11Pool) -> None:
    srv.always("GET", "/", Reply(body=b"x"))
    with trio.fail_after(LIMIT):
        async with client(srv, pool) as c:
            await c.get("/", headers={"Connection": "close"})
            await c.get("/")
    assert srv.connections_accepted == 2


async def test_cancellation_mid_request_closes_the_connection(
    srv: FaultServer, pool: H11Pool
) -> None:
    srv.script("GET", "/hang", Reply.hang())
    srv.always("GET", "/ok", Reply(body=b"ok"))
    with trio.fail_after(LIMIT):
        async with client(srv, pool) as c:
            with trio.move_on_after(0.2) as scope:
                await c.get("/hang")
            assert scope.cancelled_caught
            s = pool.statistics()
            assert (s.active_connections, s.idle_connections) == (0, 0)
            await wait_until(lambda: srv.open_connections == 0, "server saw the close")
            assert (await c.get("/ok")).content == b"ok"


async def test_cancellation_mid_body_closes_the_connection(srv: FaultServer, pool: H11Pool) -> None:
    srv.script("GET", "/slow", Reply(body=b"x" * 1000, body_delay=30))
    with trio.fail_after(LIMIT):
        async with client(srv, pool) as c:
            with trio.move_on_after(0.2):
                async with c.stream("GET", "/slow") as r:
                    await r.aread()
            s = pool.statistics()
            assert (s.active_connections, s.idle_connections) == (0, 0)
            await wait_until(lambda: srv.open_connections == 0, "server saw the close")


async def test_half_read_response_closes_the_connection(srv: FaultServer, pool: H11Pool) -> None:
    srv.always("GET", "/big", Reply(body=b"y" * 500_000))
    with trio.fail_after(LIMIT):
        async with client(srv, pool) as c:
            async with c.stream("GET", "/big") as r:
                async for _chunk in r.aiter_raw():
                    break
            assert pool.statistics().idle_connections == 0
            await c.get("/big")
    assert srv.connections_accepted == 2


async def test_concurrency_200(srv: FaultServer, pool: H11Pool) -> None:
    srv.always("POST", "/work", Reply.json({"done": True}, delay=0.05))
    results: list[int] = []

    async def one(c: httpx.AsyncClient, i: int) -> None:
        r = await c.post("/work", content=str(i).encode())
        results.append(r.status_code)

    with trio.fail_after(30):
        async with client(srv, pool) as c:
            for _round in range(2):
                async with trio.open_nursery() as nursery:
                    for i in range(200):
                        nursery.start_soon(one, c, i)
    assert results == [200] * 400
    s = pool.statistics()
    assert s.connections_opened <= 200 + 5  # the second round reuses the first round's connections
    assert s.requests_on_reused_connections >= 195
    assert s.active_connections == 0


async def test_max_connections_limits_in_flight_requests(srv: FaultServer) -> None:
    srv.always("GET", "/", Reply(body=b"x", delay=0.02))
    p = H11Pool(max_connections=5)
    with trio.fail_after(LIMIT):
        async with client(srv, p) as c, trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(c.get, "/")
    assert srv.connections_accepted <= 5 and len(srv.requests) == 40


async def test_pool_timeout(srv: FaultServer) -> None:
    srv.always("GET", "/hang", Reply.hang())
    p = H11Pool(max_connections=1)
    with trio.fail_after(LIMIT):
        async with (
            client(srv, p, timeout=httpx.Timeout(5, pool=0.1)) as c,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(c.get, "/hang")
            await trio.sleep(0.05)
            with pytest.raises(httpx.PoolTimeout):
                await c.get("/hang")
            nursery.cancel_scope.cancel()


async def test_read_timeout_closes_the_connection(srv: FaultServer, pool: H11Pool) -> None:
    srv.script("GET", "/hang", Reply.hang())
    with trio.fail_after(LIMIT):
        async with client(srv, pool, timeout=httpx.Timeout(5, read=0.2)) as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.get("/hang")
            assert pool.statistics().idle_connections == 0
            await wait_until(lambda: srv.open_connections == 0, "server saw the close")


async def test_connect_error(pool: H11Pool) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with trio.fail_after(LIMIT):
            async with httpx.AsyncClient(transport=pool) as c:
                with pytest.raises(httpx.ConnectError):
                    await c.get(f"http://127.0.0.1:{port}/")


async def test_unsupported_scheme(pool: H11Pool) -> None:
    req = httpx.Request("GET", "ftp://127.0.0.1/")
    with pytest.raises(httpx.UnsupportedProtocol):
        await pool.handle_async_request(req)


async def test_gzip_and_chunked_bodies_are_decoded_by_httpx(
    srv: FaultServer, pool: H11Pool
) -> None:
    payload = b'{"value": "' + b"z" * 10_000 + b'"}'
    srv.always(
        "GET", "/gz", Reply(body=gzip.compress(payload), headers={"Content-Encoding": "gzip"})
    )
    srv.always("GET", "/chunked", Reply(body=payload, chunked=True))
    with trio.fail_after(LIMIT):
        async with client(srv, pool) as c:
            r = await c.get("/gz")
            assert r.content == payload and r.json()["value"] == "z" * 10_000
            assert "gzip" in srv.requests[-1].headers["accept-encoding"]
            assert (await c.get("/chunked")).content == payload
            assert (await c.get("/chunked")).content == payload
    assert srv.connections_accepted == 1


async def test_head_and_204_have_no_body(srv: FaultServer, pool: H11Pool) -> None:
    srv.always("HEAD", "/", Reply(headers={"Content-Length": "1234"}))
    srv.always("DELETE", "/", Reply(status=204))
    with trio.fail_after(LIMIT):
        async with client(srv, pool) as c:
            r = await c.head("/")
            assert r.content == b"" and r.headers["content-length"] == "1234"
            assert (await c.delete("/")).status_code == 204
            await c.head("/")
    assert srv.connections_accepted == 1


async def test_large_upload_and_download(srv: FaultServer, pool: H11Pool) -> None:
    big = bytes(range(256)) * 8192  # 2 MiB

    async def echo(request: object) -> Reply:
        return Reply(body=request.body)  # type: ignore[attr-defined]

    srv.handler = echo
    with trio.fail_after(LIMIT):
        async with client(srv, pool) as c:
            r = await c.post("/echo", content=big)
            assert r.content == big


async def test_streamed_request_body(srv: FaultServer, pool: H11Pool) -> None:
    async def gen() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b"def"

    srv.always("POST", "/", Reply(body=b"ok"))
    with trio.fail_after(LIMIT):
        async with client(srv, pool) as c:
            assert (await c.post("/", content=gen())).content == b"ok"
    assert srv.requests[0].body == b"abcdef"
    assert srv.requests[0].headers.get("transfer-encoding") == "chunked"


async def test_aclose_closes_idle_connections(srv: FaultServer) -> None:
    srv.always("GET", "/", Reply(body=b"x"))
    p = H11Pool()
    with trio.fail_after(LIMIT):
        async with client(srv, p) as c, trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(c.get, "/")
        assert p.statistics().idle_connections == 0  # closing the client closed the pool
        await wait_until(lambda: srv.open_connections == 0, "all closed")
    with pytest.raises(RuntimeError, match="closed"):
        await p.handle_async_request(httpx.Request("GET", srv.base_url))


# -- the Transport over real sockets (outcomes only) ----------------------------------------------


async def test_transport_default_pool_retries_over_real_sockets(srv: FaultServer) -> None:
    # 503 with Connection: close, so the drop happens on a fresh connection: the pool does not
    # retry that, layer A does.
    srv.script(
        "POST",
        "/api/v1/op",
        Reply(status=503, close=True),
        Reply.drop_connection(),
        Reply.json({"ok": 1}),
    )
    t = Transport(Config(api_key="tml-k", base_url=srv.base_url + "/", max_retries=3))
    with trio.fail_after(LIMIT):
        r = await t.request("POST", "/api/v1/op", content=b"{}")
        assert r.json() == {"ok": 1}
        await t.aclose()
    keys = {req.headers["x-idempotency-key"] for req in srv.requests}
    assert len(keys) == 1 and len(srv.requests) == 3
    assert [req.headers["x-stainless-retry-count"] for req in srv.requests] == ["0", "1", "2"]


async def test_transport_outcomes_over_real_sockets(srv: FaultServer) -> None:
    srv.always("GET", "/api/v1/down", Reply(status=500, body=b"oops"))
    srv.always("GET", "/api/v1/hang", Reply.hang())
    t = Transport(Config(api_key="tml-k", base_url=srv.base_url, max_retries=1, timeout=0.2))
    with trio.fail_after(LIMIT):
        with pytest.raises(InternalServerError, match="oops"):
            await t.request("GET", "/api/v1/down")
        with pytest.raises(APIConnectionError):
            await t.request("GET", "/api/v1/hang")
        await t.aclose()


# -- TLS -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A throwaway self-signed certificate for 127.0.0.1, made with the openssl CLI."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            key,
            "-out",
            cert,
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def test_https_keep_alive_and_verification(tls_files: tuple[str, str]) -> None:
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    async with open_fault_server(ssl_context=server_ctx) as srv:
        srv.always("POST", "/api/v1/x", Reply.json({"tls": True}))
        assert srv.base_url.startswith("https://")
        trusting = H11Pool(ssl_context=ssl.create_default_context(cafile=cert))
        with trio.fail_after(LIMIT):
            async with httpx.AsyncClient(transport=trusting, base_url=srv.base_url) as c:
                for _ in range(3):
                    assert (await c.post("/api/v1/x", content=b"{}")).json() == {"tls": True}
            assert srv.connections_accepted == 1
            # The default context does not trust a self-signed certificate.
            async with httpx.AsyncClient(transport=H11Pool(), base_url=srv.base_url) as c:
                with pytest.raises(httpx.ConnectError):
                    await c.post("/api/v1/x", content=b"{}")
