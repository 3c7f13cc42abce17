"""HTTP hygiene of the local backend (issue 11, item 2): authentication before the body, the
per-request body limit, the server-wide budget of body bytes being read, read timeouts.

The app is called directly as ASGI (FakeEngine inline, virtual time) with a `receive` the test
controls, so it can see exactly how much of a body the app asked for and when it gave up. A
real-socket test checks the same promises end to end through hypercorn.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import trio
from server_testing import API_KEY, open_harness

from tinkex_trio.local import open_local_backend
from tinkex_trio.local._app import BackendApp
from tinkex_trio.local.testing import FakeEngine

MiB = 1024 * 1024


class Exchange:
    """One ASGI request: feeds body pieces on demand and records the answer."""

    def __init__(
        self, body_pieces: list[bytes], *, stall: bool = False, gate: trio.Event | None = None
    ) -> None:
        self.pieces = list(body_pieces)
        self.stall = stall
        self.gate = gate  # when given: wait for it after the first piece
        self.received = 0  # body bytes the app asked for and got
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = b""

    async def receive(self) -> dict[str, Any]:
        if not self.pieces:
            if self.stall:
                await trio.sleep_forever()
            return {"type": "http.disconnect"}
        if self.gate is not None and self.received:
            await self.gate.wait()
        piece = self.pieces.pop(0)
        self.received += len(piece)
        more = bool(self.pieces) or self.stall
        return {"type": "http.request", "body": piece, "more_body": more}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = {k.decode(): v.decode() for k, v in message["headers"]}
        else:
            self.body += message.get("body", b"")


def _scope(path: str, headers: dict[str, str], method: str = "POST") -> dict[str, Any]:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": b"",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
    }


Call = Callable[[dict[str, Any], Exchange], Awaitable[Exchange]]


def _caller(app: BackendApp) -> Call:
    async def call(scope: dict[str, Any], exchange: Exchange) -> Exchange:
        await app(scope, exchange.receive, exchange.send)  # type: ignore[arg-type]
        return exchange

    return call


async def test_unauthenticated_body_is_never_read(tmp_path: Path, autojump_clock: object) -> None:
    async with open_harness(tmp_path) as h:
        call = _caller(h.app)
        big = [b"x" * MiB] * 200
        for headers in (
            {"content-length": str(200 * MiB)},
            {"content-length": str(200 * MiB), "x-api-key": "tml-wrong"},
            {"transfer-encoding": "chunked", "x-api-key": "tml-wrong"},
        ):
            ex = await call(_scope("/api/v1/create_session", headers), Exchange(big))
            assert ex.status == 401, ex.body
            assert ex.received == 0
        # An unknown route is refused from the head too.
        ex = await call(_scope("/api/v1/nope", {"x-api-key": API_KEY}), Exchange(big))
        assert (ex.status, ex.received) == (404, 0)
        assert h.app.body_budget.in_use == 0


async def test_body_limit_413_before_and_while_reading(
    tmp_path: Path, autojump_clock: object
) -> None:
    async with open_harness(tmp_path, max_request_body=4 * MiB) as h:
        call = _caller(h.app)
        auth = {"x-api-key": API_KEY}
        pieces = [b" " * MiB] * 5
        declared = {**auth, "content-length": str(5 * MiB)}
        ex = await call(_scope("/api/v1/create_session", declared), Exchange(pieces))
        assert (ex.status, ex.received) == (413, 0)
        assert b"5242880 bytes is larger than 4194304" in ex.body
        # Without a Content-Length the body is cut off as soon as it passes the limit.
        ex = await call(_scope("/api/v1/create_session", auth), Exchange(pieces))
        assert ex.status == 413
        assert ex.received == 5 * MiB
        assert h.app.body_budget.in_use == 0
        # A normal request still works.
        assert (await h.post("session_heartbeat", {"session_id": await h.session()})).is_success


async def test_body_budget_503_with_retry_after(tmp_path: Path, autojump_clock: object) -> None:
    async with open_harness(
        tmp_path, max_request_body=4 * MiB, max_body_bytes_in_flight=6 * MiB
    ) as h:
        call = _caller(h.app)
        auth = {"x-api-key": API_KEY, "content-length": str(4 * MiB)}
        gate = trio.Event()
        slow = Exchange([b" " * MiB] * 4, gate=gate)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, _scope("/api/v1/create_session", auth), slow)
            await trio.sleep(1.0)
            assert (slow.received, h.app.body_budget.in_use) == (MiB, 4 * MiB)
            second = await call(_scope("/api/v1/create_session", auth), Exchange([b"{}"]))
            assert second.status == 503
            assert second.headers["retry-after"] == "1"
            assert second.received == 0
            gate.set()
        # The first request was read whole and answered (its body is not JSON: 400), and
        # gave its reservation back.
        assert (slow.status, slow.received) == (400, 4 * MiB)
        assert h.app.body_budget.in_use == 0
        ok = Exchange([b'{"sdk_version": "t"}'])
        small = {"x-api-key": API_KEY, "content-length": "20"}
        assert (await call(_scope("/api/v1/create_session", small), ok)).status == 200


async def test_stalled_body_times_out_at_read_timeout(
    tmp_path: Path, autojump_clock: object
) -> None:
    async with open_harness(tmp_path, read_timeout=7.0) as h:
        call = _caller(h.app)
        start = trio.current_time()
        ex = Exchange([b'{"sdk_ver'], stall=True)
        await call(_scope("/api/v1/create_session", {"x-api-key": API_KEY}), ex)
        assert ex.status == 408
        assert trio.current_time() - start == 7.0
        assert b"stalled for 7 s" in ex.body


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(0.5)
    return sock


async def test_real_socket_half_open_and_unauthenticated_uploads(tmp_path: Path) -> None:
    """Over hypercorn: a connection that sends nothing or half a head is closed (after the
    5 s keep-alive timer), one that sends a head and no body is answered 408 after
    `read_timeout`; an unauthenticated upload is answered 401 (or cut) without being read;
    the server serves normally afterwards."""
    async with open_local_backend(
        data_dir=tmp_path, engine=FakeEngine(), read_timeout=1.0
    ) as backend:
        port = int(backend.base_url.rsplit(":", 1)[1])
        half_open = [_connect(port) for _ in range(30)]
        for index, sock in enumerate(half_open):
            if index % 3 == 0:  # a head that never ends
                sock.sendall(b"POST /api/v1/create_session HTTP/1.1\r\nhost: x\r\nx-api")
            elif index % 3 == 1:  # connected, nothing sent
                pass
            else:  # a whole head, no body
                sock.sendall(
                    b"POST /api/v1/create_session HTTP/1.1\r\nhost: x\r\n"
                    + f"x-api-key: {backend.api_key}\r\ncontent-length: 100\r\n\r\n".encode()
                )
        with trio.fail_after(20):
            for sock in half_open:
                while True:
                    try:
                        data = await trio.to_thread.run_sync(sock.recv, 65536)
                    except TimeoutError:
                        continue
                    if data == b"" or b"408" in data:
                        break
                sock.close()
        async with httpx.AsyncClient(base_url=backend.base_url) as client:
            for _ in range(2):
                try:
                    r = await client.post(
                        "/api/v1/create_session",
                        content=b"x" * (250 * MiB),
                        headers={"X-API-Key": "tml-wrong"},
                    )
                except httpx.TransportError:
                    pass  # the server answered 401 and closed while we were still sending
                else:
                    assert r.status_code == 401
            r = await client.post(
                "/api/v1/create_session",
                json={"sdk_version": "t"},
                headers={"X-API-Key": backend.api_key},
            )
            assert r.status_code == 200
