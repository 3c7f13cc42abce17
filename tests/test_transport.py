"""Transport: headers, the call policies (layers A and B, billing), error mapping, credentials.

Rules: retry schedules run in virtual time (`autojump_clock`, pytest-trio's built-in fixture)
over `httpx.MockTransport`, with no real I/O, and assert exact virtual times. The tests at the end
use real sockets on 127.0.0.1 (the fault server) and assert outcomes under `trio.fail_after`.
"""

from __future__ import annotations

import dataclasses
import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable

import httpx
import msgspec
import pytest
import trio

from tinkex_trio._policy import (
    CALL,
    HEARTBEAT,
    LAYER_A,
    LAYER_B,
    ONE_ATTEMPT,
    SAMPLE_RETRY,
    SAVE,
    SUBMIT,
    CallPolicy,
)
from tinkex_trio._transport import Transport
from tinkex_trio.config import Config
from tinkex_trio.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    BillingError,
    ClientClosedError,
    InternalServerError,
    NotFoundError,
    RateLimitError,
    status_error_for,
)
from tinkex_trio.telemetry import Event, RequestFailed, RequestFinished, RetryScheduled, Telemetry

KEY = "tml-test-key-0123456789-SECRET"
BASE = "http://api.test/prefix"


class FixedRandom(random.Random):
    """uniform() returns a fixed fraction of the way from a to b, for exact back-off delays."""

    def __init__(self, fraction: float = 1.0) -> None:
        super().__init__(0)
        self.fraction = fraction

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.fraction


Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


class Recorder:
    """A MockTransport handler that replays a list of outcomes and records requests."""

    def __init__(
        self, *outcomes: httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]
    ) -> None:
        self.outcomes = list(outcomes)
        self.requests: list[httpx.Request] = []
        self.times: list[float] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.times.append(trio.current_time())
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        if isinstance(outcome, httpx.Response):
            return httpx.Response(
                outcome.status_code, headers=outcome.headers, content=outcome.content
            )
        return outcome(request)


def make(
    handler: Recorder, *, fraction: float = 1.0, telemetry: Telemetry | None = None, **cfg: object
) -> Transport:
    config = Config(api_key=KEY, base_url=BASE, **cfg)  # type: ignore[arg-type]
    return Transport(
        config,
        transport=httpx.MockTransport(handler),
        telemetry=telemetry,
        rng=FixedRandom(fraction),
    )


def ok(body: bytes = b'{"ok": true}', headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(200, content=body, headers=headers)


def status(code: int, body: bytes = b'{"detail": "x"}', **headers: str) -> httpx.Response:
    return httpx.Response(
        code, content=body, headers={k.replace("_", "-"): v for k, v in headers.items()}
    )


# -- headers and URLs -------------------------------------------------------------------------------


async def test_headers_and_url_join() -> None:
    rec = Recorder(ok())
    config = Config(
        api_key=KEY,
        base_url=BASE + "/",
        cf_access_client_id="cf-id",
        cf_access_client_secret="cf-secret",
        extra_headers={"X-Extra": "1"},
    )
    t = Transport(config, transport=httpx.MockTransport(rec))
    resp = await t.request("POST", "/api/v1/create_session", content=b"{}", params={"a": 1})
    assert resp.json() == {"ok": True}
    req = rec.requests[0]
    assert str(req.url) == "http://api.test/prefix/api/v1/create_session?a=1"
    h = req.headers
    assert h["x-api-key"] == KEY
    assert h["user-agent"].startswith("tinkex-trio/")
    assert h["accept"] == "application/json"
    assert h["content-type"] == "application/json"
    assert h["x-idempotency-key"].startswith("tinkex-trio-retry-")
    assert h["x-stainless-retry-count"] == "0"
    assert h["cf-access-client-id"] == "cf-id" and h["cf-access-client-secret"] == "cf-secret"
    assert h["x-extra"] == "1"
    assert req.content == b"{}"

    await t.request(
        "GET",
        "/api/v1/sessions/sess:1/x",
        headers={"X-Custom": "y"},
        policy=dataclasses.replace(CALL, accept="text/plain"),
    )
    get = rec.requests[1]
    assert get.url.path == "/prefix/api/v1/sessions/sess:1/x"
    assert "x-idempotency-key" not in get.headers and "content-type" not in get.headers
    assert get.headers["x-custom"] == "y" and get.headers["accept"] == "text/plain"
    await t.aclose()


async def test_idempotency_key_is_new_per_call_and_can_be_given() -> None:
    rec = Recorder(ok())
    t = make(rec)
    await t.request("POST", "/a", content=b"1")
    await t.request("POST", "/a", content=b"1")
    await t.request("POST", "/a", content=b"1", headers={"X-Idempotency-Key": "mine"})
    keys = [r.headers["x-idempotency-key"] for r in rec.requests]
    assert keys[0] != keys[1] and keys[2] == "mine"


# -- layer A ----------------------------------------------------------------------------------------


async def test_layer_a_backoff_schedule_and_stable_idempotency_key(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rec = Recorder(status(503))
    t = make(rec, max_retries=3)
    with pytest.raises(InternalServerError) as info:
        await t.request("POST", "/api/v1/x", content=b"{}")
    assert info.value.status_code == 503
    assert rec.times == [0.0, 0.5, 1.5, 3.5]
    assert [r.headers["x-stainless-retry-count"] for r in rec.requests] == ["0", "1", "2", "3"]
    assert len({r.headers["x-idempotency-key"] for r in rec.requests}) == 1


async def test_layer_a_delay_is_capped_at_ten_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rec = Recorder(status(500))
    t = make(rec, max_retries=7)
    with pytest.raises(InternalServerError):
        await t.request("GET", "/x")
    gaps = [b - a for a, b in zip(rec.times, rec.times[1:], strict=False)]
    assert gaps == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


async def test_layer_a_jitter_lower_bound(autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder(status(429), status(429), ok())
    t = make(rec, fraction=0.0)
    await t.request("GET", "/x")
    assert rec.times == [0.0, 0.375, 0.375 + 0.75]


async def test_default_jitter_stays_in_bounds(autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder(status(502), ok())
    config = Config(api_key=KEY, base_url=BASE)
    t = Transport(config, transport=httpx.MockTransport(rec))
    await t.request("GET", "/x")
    assert 0.375 <= rec.times[1] <= 0.5


# -- PROTOCOL.md 1.6: a bare 400 is a "Cloudflare reset" --------------------------------------------


async def test_bare_400_is_retried_as_a_connection_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rec = Recorder(status(400, b""), status(400, b""), ok())
    t = make(rec)
    resp = await t.request("POST", "/api/v1/x", content=b"{}")
    assert resp.status_code == 200
    assert rec.times == [0.0, 0.5, 1.5]
    assert len({r.headers["x-idempotency-key"] for r in rec.requests}) == 1


async def test_bare_400_out_of_layer_a_retries_is_a_connection_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rec = Recorder(status(400, b""))
    t = make(rec, max_retries=2)
    with pytest.raises(APIConnectionError, match="empty body"):
        await t.request("GET", "/x")
    assert len(rec.requests) == 3


async def test_400_with_a_body_is_not_retried() -> None:
    rec = Recorder(status(400))
    t = make(rec)
    with pytest.raises(APIStatusError) as info:
        await t.request("GET", "/x")
    assert info.value.status_code == 400
    assert len(rec.requests) == 1


async def test_bare_400_budget_is_spent_and_replenished_by_successes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 16 bare 400s are retried; the 17th is the server's answer (a plain 400 error).
    rec = Recorder(*([status(400, b"")] * 17), ok())
    t = make(rec, max_retries=100)
    with pytest.raises(APIStatusError) as info:
        await t.request("GET", "/x")
    assert info.value.status_code == 400
    assert len(rec.requests) == 17
    # Two successes give two units back: two bare 400s are retried again, a third is not.
    rec.outcomes = [ok(), ok(), status(400, b""), status(400, b""), status(400, b""), ok()]
    await t.request("GET", "/x")
    await t.request("GET", "/x")
    with pytest.raises(APIStatusError):
        await t.request("GET", "/x")
    assert len(rec.requests) == 17 + 2 + 3


@pytest.mark.parametrize(
    ("headers", "expected_gap"),
    [
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": "0.25"}, 0.25),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "1500", "retry-after": "9"}, 1.5),
        ({"retry-after": "61"}, 0.5),  # above 60 s: ignored
        ({"retry-after": "0"}, 0.5),  # not positive: ignored
        ({"retry-after": "soon"}, 0.5),  # unparseable: ignored
    ],
)
async def test_retry_after(
    autojump_clock: trio.testing.MockClock, headers: dict[str, str], expected_gap: float
) -> None:
    rec = Recorder(httpx.Response(429, headers=headers, content=b"{}"), ok())
    t = make(rec)
    await t.request("POST", "/x", content=b"")
    assert rec.times[1] - rec.times[0] == pytest.approx(expected_gap)


async def test_retry_after_http_date(autojump_clock: trio.testing.MockClock) -> None:
    when = email.utils.formatdate(time.time() + 5, usegmt=True)
    rec = Recorder(httpx.Response(503, headers={"retry-after": when}, content=b"{}"), ok())
    t = make(rec)
    await t.request("GET", "/x")
    assert 3.0 <= rec.times[1] <= 5.0  # whole seconds in the date, and wall time moves on


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (408, APIStatusError),
        (409, APIStatusError),
        (429, RateLimitError),
        (500, InternalServerError),
        (504, InternalServerError),
    ],
)
async def test_retryable_statuses(
    autojump_clock: trio.testing.MockClock, code: int, cls: type[APIStatusError]
) -> None:
    rec = Recorder(status(code))
    t = make(rec, max_retries=2)
    with pytest.raises(cls):
        await t.request("GET", "/x")
    assert len(rec.requests) == 3


@pytest.mark.parametrize("code", [400, 401, 402, 403, 404, 410, 422])
async def test_non_retryable_statuses(autojump_clock: trio.testing.MockClock, code: int) -> None:
    rec = Recorder(status(code))
    t = make(rec)
    with pytest.raises(APIStatusError) as info:
        await t.request("GET", "/x")
    assert info.value.status_code == code
    assert len(rec.requests) == 1 and trio.current_time() == 0


async def test_x_should_retry(autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder(status(503, x_should_retry="false"))
    t = make(rec)
    with pytest.raises(InternalServerError):
        await t.request("GET", "/x")
    assert len(rec.requests) == 1

    rec2 = Recorder(status(400, x_should_retry="true"), ok())
    t2 = make(rec2)
    assert (await t2.request("GET", "/x")).status_code == 200
    assert len(rec2.requests) == 2


async def test_max_retries_zero_and_per_call_override(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rec = Recorder(status(503))
    t = make(rec)
    with pytest.raises(InternalServerError):
        await t.request("GET", "/x", policy=ONE_ATTEMPT)
    assert len(rec.requests) == 1
    t0 = make(rec, max_retries=0)
    with pytest.raises(InternalServerError):
        await t0.request("GET", "/x")
    assert len(rec.requests) == 2
    # A policy's own layer-A limit wins over Config.max_retries.
    one_retry = CallPolicy("one_retry", (dataclasses.replace(LAYER_A, limit=1),))
    with pytest.raises(InternalServerError):
        await t0.request("GET", "/x", policy=one_retry)
    assert len(rec.requests) == 4


async def test_raise_for_status_false_returns_the_final_response(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rec = Recorder(status(404, b"gone"))
    t = make(rec)
    resp = await t.request("GET", "/x", raise_for_status=False)
    assert resp.status_code == 404 and resp.content == b"gone"
    rec2 = Recorder(status(503))
    resp2 = await make(rec2, max_retries=1).request("GET", "/x", raise_for_status=False)
    assert resp2.status_code == 503 and len(rec2.requests) == 2


async def test_connection_errors_are_retried_then_mapped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rec = Recorder(httpx.ConnectError("refused"), httpx.ReadError("reset"), ok())
    t = make(rec)
    assert (await t.request("POST", "/x", content=b"1")).status_code == 200
    assert rec.times == [0.0, 0.5, 1.5]
    assert len({r.headers["x-idempotency-key"] for r in rec.requests}) == 1

    rec2 = Recorder(httpx.RemoteProtocolError("Server disconnected"))
    with pytest.raises(APIConnectionError) as info:
        await make(rec2, max_retries=2).request("GET", "/x")
    assert type(info.value) is APIConnectionError
    assert isinstance(info.value.__cause__, httpx.RemoteProtocolError)
    assert len(rec2.requests) == 3


async def test_timeouts_map_to_api_timeout_error(autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder(httpx.ReadTimeout("slow"))
    with pytest.raises(APITimeoutError) as info:
        await make(rec, max_retries=1).request("GET", "/x")
    assert isinstance(info.value.__cause__, httpx.ReadTimeout)
    assert info.value.request is not None
    assert len(rec.requests) == 2


async def test_unsupported_protocol_is_not_retried(autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder(httpx.UnsupportedProtocol("nope"))
    with pytest.raises(APIConnectionError):
        await make(rec).request("GET", "/x")
    assert len(rec.requests) == 1


async def test_timeout_is_passed_to_httpx() -> None:
    seen: list[dict[str, float | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.extensions["timeout"])
        return httpx.Response(200, content=b"{}")

    t = Transport(
        Config(api_key=KEY, base_url=BASE, timeout=60, connect_timeout=5),
        transport=httpx.MockTransport(handler),
    )
    await t.request("GET", "/x")
    await t.request("GET", "/x", policy=HEARTBEAT)  # the table's 10 s (PROTOCOL.md 1.5)
    assert seen[0] == {"connect": 5.0, "read": 60.0, "write": 60.0, "pool": 60.0}
    assert seen[1]["read"] == 10.0


async def test_telemetry_events(autojump_clock: trio.testing.MockClock) -> None:
    hub = Telemetry()
    events: list[Event] = []
    hub.add_handler(events.append)
    rec = Recorder(httpx.ConnectError("x"), status(503), ok())
    await make(rec, telemetry=hub).request("POST", "/api/v1/y", content=b"")
    kinds = [type(e).__name__ for e in events]
    assert kinds == [
        "RequestStarted",
        "RequestFailed",
        "RetryScheduled",
        "RequestStarted",
        "RequestFinished",
        "RetryScheduled",
        "RequestStarted",
        "RequestFinished",
    ]
    failed = events[1]
    assert isinstance(failed, RequestFailed) and failed.error_type == "ConnectError"
    retry = events[5]
    assert isinstance(retry, RetryScheduled) and retry.reason == "status 503" and retry.delay == 1.0
    last = events[-1]
    assert isinstance(last, RequestFinished) and last.status == 200 and last.attempt == 2
    assert all(e.path == "/api/v1/y" for e in events if hasattr(e, "path"))


async def test_retries_are_logged(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder(status(503), status(503), ok())
    with caplog.at_level(logging.INFO, logger="tinkex_trio.transport"):
        await make(rec).request("GET", "/x")
    assert len([r for r in caplog.records if r.getMessage().startswith("Retrying GET /x")]) == 2


async def test_deprecation_note_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder(ok(headers={"x-deprecation-note": "old", "x-deprecation-level": "error"}))
    with caplog.at_level(logging.WARNING, logger="tinkex_trio.transport"):
        await make(rec).request("GET", "/x")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.ERROR, "Server deprecation note: old")
    ]


# -- secrets ----------------------------------------------------------------------------------------


async def test_api_key_never_leaks(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    hub = Telemetry()
    events: list[Event] = []
    hub.add_handler(events.append)
    rec = Recorder(httpx.ConnectError("x"), status(401, b'{"detail": "bad key"}'))
    t = make(rec, telemetry=hub)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(APIStatusError) as info:
            await t.request("GET", "/x")
    texts = [
        str(info.value),
        repr(info.value),
        repr(info.value.request),
        repr(t),
        repr(t.config),
        caplog.text,
    ]
    texts.append(msgspec.json.encode(events).decode())
    for text in texts:
        assert KEY not in text
    rec2 = Recorder(httpx.ConnectError("x"))
    with pytest.raises(APIConnectionError) as info2:
        await make(rec2, max_retries=0).request("GET", "/x")
    assert KEY not in str(info2.value) + repr(info2.value)


async def test_credentials_only_to_base_origin() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "api.test" and request.url.path.endswith("/redirect"):
            return httpx.Response(302, headers={"location": "http://files.test/archive.tar"})
        return httpx.Response(200, content=b"data")

    seen: list[httpx.Request] = []

    async def recording(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    config = Config(
        api_key=KEY, base_url=BASE, cf_access_client_secret="cfs", extra_headers={"X-Extra": "e"}
    )
    t = Transport(config, transport=httpx.MockTransport(recording))
    async with t.stream("GET", "http://files.test/direct") as resp:
        assert await resp.aread() == b"data"
    await t.request("GET", "/redirect")
    async with t.stream("GET", "http://api.test/prefix/other") as resp:
        await resp.aread()
    direct, first_hop, second_hop, same_origin = seen
    for req in (direct, second_hop):
        assert req.url.host == "files.test"
        assert "x-api-key" not in req.headers and "cf-access-client-secret" not in req.headers
        assert "x-extra" not in req.headers
    assert first_hop.headers["x-api-key"] == KEY and same_origin.headers["x-api-key"] == KEY


# -- stream -----------------------------------------------------------------------------------------


async def test_stream_yields_unread_body_and_maps_errors(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def chunks() -> object:
        yield b"ab"
        yield b"cd"

    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            return httpx.Response(503, content=b"busy")
        if request.url.path.endswith("missing"):
            return httpx.Response(404, content=b'{"detail": "no"}')
        return httpx.Response(200, content=chunks())  # type: ignore[arg-type]

    t = Transport(
        Config(api_key=KEY, base_url=BASE),
        transport=httpx.MockTransport(handler),
        rng=FixedRandom(),
    )
    async with t.stream("GET", "/file") as resp:
        assert not resp.is_stream_consumed
        assert [c async for c in resp.aiter_bytes()] == [b"ab", b"cd"]
    assert trio.current_time() == 0.5  # one layer-A retry of the 503
    with pytest.raises(NotFoundError) as info:
        async with t.stream("GET", "/missing"):
            pytest.fail("not reached")
    assert info.value.body == {"detail": "no"}


# -- closing ----------------------------------------------------------------------------------------


async def test_closed_transport_raises() -> None:
    t = make(Recorder(ok()))
    assert not t.is_closed
    await t.aclose()
    await t.aclose()
    assert t.is_closed
    with pytest.raises(ClientClosedError, match="open_service"):
        await t.request("GET", "/x")
    with pytest.raises(ClientClosedError):
        async with t.stream("GET", "/x"):
            pass


# -- layer B --------------------------------------------------------------------------------------


def budget(seconds: float, *, layer_a: bool = False) -> CallPolicy:
    """A submit-like policy with layer B cut to `seconds` (and layer A only if asked)."""
    rows = (LAYER_A,) if layer_a else ()
    return CallPolicy(
        "test", (*rows, dataclasses.replace(LAYER_B, budget=seconds)), billing_pause=True
    )


async def test_layer_b_schedule_until_budget(autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder(status(503))
    t = make(rec)
    with pytest.raises(InternalServerError):
        await t.request("POST", "/api/v1/op", content=b"{}", policy=SAVE)
    assert rec.times == [0, 1, 3, 7, 15, 31, 61, 91, 121, 151, 181, 211, 241, 271, 300]
    assert trio.current_time() == 300
    # Each layer-B attempt is a rebuilt request: a new idempotency key, the same body.
    assert len({r.headers["x-idempotency-key"] for r in rec.requests}) == len(rec.requests)
    assert {r.headers["x-stainless-retry-count"] for r in rec.requests} == {"0"}
    assert {r.content for r in rec.requests} == {b"{}"}


async def test_layer_b_after_layer_a(autojump_clock: trio.testing.MockClock) -> None:
    # The submit policy: two quick layer-A retries of one request, then layer B rebuilds it and
    # layer A starts again.
    rec = Recorder(*[status(503)] * 4, ok())
    t = make(rec, max_retries=2)
    await t.request("POST", "/api/v1/op", content=b"{}", policy=SUBMIT)
    assert rec.times == [0, 0.5, 1.5, 2.5, 3.0]
    counts = [r.headers["x-stainless-retry-count"] for r in rec.requests]
    assert counts == ["0", "1", "2", "0", "1"]
    keys = [r.headers["x-idempotency-key"] for r in rec.requests]
    assert keys[0] == keys[1] == keys[2] != keys[3] == keys[4]


async def test_layer_b_custom_budget_and_success(autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder(
        httpx.ReadTimeout("slow"),
        httpx.ConnectError("refused"),
        status(429),
        status(408),
        status(409),
        ok(),
    )
    t = make(rec)
    assert (await t.request("GET", "/op", policy=budget(100))).status_code == 200
    assert rec.times == [0, 1, 3, 7, 15, 31]
    rec2 = Recorder(status(500))
    with pytest.raises(InternalServerError):
        await make(rec2).request("GET", "/op", policy=budget(5))
    assert [x - rec2.times[0] for x in rec2.times] == [0, 1, 3, 5]


async def test_layer_b_does_not_retry_other_errors(autojump_clock: trio.testing.MockClock) -> None:
    for outcome, error in (
        (status(404), NotFoundError),
        (status(400), APIStatusError),
        (ValueError("bug"), ValueError),
    ):
        rec = Recorder(outcome)
        with pytest.raises(error):
            await make(rec).request("POST", "/op", content=b"{}", policy=SUBMIT)
        assert len(rec.requests) == 1
    assert trio.current_time() == 0


async def test_billing_pause_gives_up_after_an_hour(autojump_clock: trio.testing.MockClock) -> None:
    rec = Recorder(status(402))
    t = make(rec)
    with pytest.raises(BillingError):
        await t.request("POST", "/api/v1/op", content=b"{}", policy=SUBMIT)
    assert trio.current_time() == 3600
    assert len(rec.times) == 721 and rec.times[1] == 5


async def test_billing_pause_then_success_and_budget_excludes_pause(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rec = Recorder(status(402), status(402), status(503), status(503), ok())
    t = Transport(
        Config(api_key=KEY, base_url=BASE),
        transport=httpx.MockTransport(rec),
        billing_pause_max=60,
    )
    assert (await t.request("GET", "/op", policy=budget(2))).status_code == 200
    # 402 at 0 and 5 (paused 10 s, not counted), then 503 at 10 (sleep 1) and at 11 (sleep 1 = the rest).
    assert rec.times == [0, 5, 10, 11, 12]
    rec2 = Recorder(status(402))
    t2 = Transport(
        Config(api_key=KEY, base_url=BASE),
        transport=httpx.MockTransport(rec2),
        billing_pause_max=60,
    )
    with pytest.raises(BillingError):
        await t2.request("GET", "/op", policy=budget(2))
    assert rec2.times[-1] - rec2.times[0] == 60


async def test_billing_pause_is_one_incident_for_the_whole_transport(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """PROTOCOL.md 9.6: every call shares one incident, and it resets after 5 quiet minutes."""
    rec = Recorder(status(402))
    t = make(rec)
    t.billing_pause_max = 30
    caplog.set_level(logging.WARNING, logger="tinkex_trio.transport")
    results: list[tuple[str, float]] = []

    async def call(name: str, start: float) -> None:
        await trio.sleep(start)
        with pytest.raises(BillingError):
            await t.request("POST", "/op", content=b"{}", policy=SUBMIT)
        results.append((name, trio.current_time()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, "first", 0)
        nursery.start_soon(call, "late", 20)
    # The late call joined the incident that began at 0: both give up at 30 s.
    assert sorted(results) == [("first", 30), ("late", 30)]
    assert len([r for r in caplog.records if "billing is not active" in r.getMessage()]) == 1
    # More than 5 minutes without a 402: a new incident, a new 30 s window.
    await trio.sleep(301)
    started = trio.current_time()
    with pytest.raises(BillingError):
        await t.request("POST", "/op", content=b"{}", policy=SUBMIT)
    assert trio.current_time() - started == 30


async def test_layer_b_emits_retry_events(autojump_clock: trio.testing.MockClock) -> None:
    hub = Telemetry()
    events: list[Event] = []
    hub.add_handler(events.append)
    t = make(Recorder(status(503), ok()), telemetry=hub)
    await t.request("POST", "/api/v1/op", content=b"{}", policy=SAVE)
    (event,) = [e for e in events if isinstance(e, RetryScheduled)]
    assert (event.method, event.path, event.delay, event.reason) == (
        "POST",
        "/api/v1/op",
        1.0,
        "layer B: status 503",
    )


# -- a whole operation (PROTOCOL.md 9.4's layer D) ---------------------------------------------------


def _error(code: int) -> APIStatusError:
    request = httpx.Request("POST", BASE + "/api/v1/op")
    return status_error_for(httpx.Response(code, content=b"{}", request=request))


class Flaky:
    """An operation for `Transport.retry`: raises the given errors in turn, then returns "done"."""

    def __init__(self, *errors: Exception, forever: bool = False) -> None:
        self.errors = list(errors)
        self.forever = forever
        self.times: list[float] = []
        self.attempts: list[int] = []

    async def __call__(self, attempt: int) -> str:
        self.times.append(trio.current_time())
        self.attempts.append(attempt)
        await trio.lowlevel.checkpoint()
        if self.errors:
            err = self.errors[0] if self.forever else self.errors.pop(0)
            raise err
        return "done"


async def test_sample_retry_schedule_and_what_it_retries(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = Telemetry()
    events: list[Event] = []
    hub.add_handler(events.append)
    t = make(Recorder(ok()), telemetry=hub, fraction=0.5)  # jitter U(0.75, 1.25) -> 1.0
    op = Flaky(APIConnectionError("down"), _error(410), _error(503), _error(429), _error(409))
    assert await t.retry(SAMPLE_RETRY, op) == "done"
    # min(0.5 * 2**k, 10) s: 0.5, 1, 2, 4, 8.
    assert op.times == [0, 0.5, 1.5, 3.5, 7.5, 15.5]
    assert op.attempts == [0, 1, 2, 3, 4, 5]
    reasons = [e.reason for e in events if isinstance(e, RetryScheduled)]
    assert reasons[:2] == ["sample retry: APIConnectionError", "sample retry: status 410"]
    for err in (_error(400), _error(404), _error(402), ValueError("bug")):
        once = Flaky(err, forever=True)
        with pytest.raises(type(err)):
            await t.retry(SAMPLE_RETRY, once)
        assert len(once.times) == 1
