"""The retrieve_future loop (PROTOCOL.md 4.2-4.7) in virtual time, over MockTransport.

The HTTP errors of a poll are the transport's ``poll`` policy (`tinkex_trio._policy`), so these
tests pin that policy too, through `FuturePoller.poll` as the SDK uses it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from tinkex_trio import types as t
from tinkex_trio._polling import FuturePoller, json_decoder
from tinkex_trio._transport import Transport
from tinkex_trio.config import Config
from tinkex_trio.errors import (
    APIError,
    BadRequestError,
    BillingError,
    ClientClosedError,
    GoneError,
    NotFoundError,
    RequestFailedError,
    ResultTimeoutError,
)
from tinkex_trio.futures import APIFuture
from tinkex_trio.telemetry import FutureCompleted, QueueStateChanged, Telemetry

Step = httpx.Response | type[Exception]


class Script:
    """Answers polls from a list; records (virtual time, body, headers) of each poll."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps: Iterator[Step] = iter(steps)
        self.polls: list[tuple[float, dict[str, Any], httpx.Headers]] = []

    def transport(self) -> httpx.MockTransport:
        async def handle(request: httpx.Request) -> httpx.Response:
            self.polls.append(
                (trio.current_time(), json.loads(await request.aread()), request.headers)
            )
            step = next(self.steps)
            if isinstance(step, type):
                raise step("injected", request=request)  # type: ignore[call-arg]
            return step

        return httpx.MockTransport(handle)


def ok(obj: Any, status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=obj)


TRY_AGAIN = ok({"type": "try_again", "request_id": "r1", "queue_state": "active"})
RESULT = ok({"path": "tinker://m/weights/a"})


def poller_for(script: Script, telemetry: Telemetry | None = None, **kwargs: Any) -> FuturePoller:
    """A poller over a fresh transport (so a fresh billing incident); `kwargs` go to it."""
    config = Config(api_key="tml-secret-key", base_url="http://fake")
    transport = Transport(config, transport=script.transport(), **kwargs)
    return FuturePoller(transport, telemetry or Telemetry())


async def poll(script: Script, **kwargs: Any) -> t.SaveWeightsResponse:
    return await poller_for(script, **kwargs).poll(
        "r1", "SaveWeights", json_decoder(t.SaveWeightsResponse)
    )


async def test_try_again_repolls_at_once_with_iteration_headers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    script = Script([TRY_AGAIN, TRY_AGAIN, RESULT])
    result = await poll(script)
    assert result.path == "tinker://m/weights/a"
    assert [p[0] for p in script.polls] == [0, 0, 0]
    assert [p[2]["x-tinker-request-iteration"] for p in script.polls] == ["0", "1", "2"]
    assert {p[2]["x-tinker-request-type"] for p in script.polls} == {"SaveWeights"}
    assert script.polls[0][1] == {"request_id": "r1", "allow_metadata_only": True}
    # Polls are single attempts: layer-A retries are off.
    assert {p[2]["x-stainless-retry-count"] for p in script.polls} == {"0"}


async def test_queue_state_changes_are_reported_once_each(
    autojump_clock: trio.testing.MockClock,
) -> None:
    paused = ok(
        {
            "type": "try_again",
            "request_id": "r1",
            "queue_state": "paused_capacity",
            "queue_state_reason": "busy",
        }
    )
    timeout_408 = ok({"queue_state": "paused_rate_limit"}, status=408)
    script = Script([paused, paused, timeout_408, TRY_AGAIN, RESULT])
    telemetry = Telemetry()
    events: list[object] = []
    telemetry.add_handler(events.append)
    fut: APIFuture[t.SaveWeightsResponse] = APIFuture("SaveWeights")
    await poller_for(script, telemetry).poll(
        "r1", "SaveWeights", json_decoder(t.SaveWeightsResponse), on_queue_state=fut._on_queue_state
    )
    states = [(e.queue_state, e.reason) for e in events if isinstance(e, QueueStateChanged)]
    assert states == [("paused_capacity", "busy"), ("paused_rate_limit", None), ("active", None)]
    assert fut.queue_state == "active"
    done = [e for e in events if isinstance(e, FutureCompleted)]
    assert len(done) == 1 and done[0].ok and done[0].request_id == "r1"


async def test_failed_request_raises_with_category(autojump_clock: trio.testing.MockClock) -> None:
    script = Script([ok({"error": "sequence too long", "category": "user"})])
    with pytest.raises(RequestFailedError) as info:
        await poll(script)
    assert info.value.category == "user"
    assert info.value.request_id == "r1"
    assert "sequence too long" in str(info.value)


async def test_429_and_connection_errors_back_off_exponentially(
    autojump_clock: trio.testing.MockClock,
) -> None:
    busy = ok({"detail": "slow down"}, status=429)
    script = Script([busy, busy, httpx.ConnectError, busy, RESULT])
    await poll(script)
    assert [p[0] for p in script.polls] == [0, 1, 1 + 2, 1 + 2 + 4, 1 + 2 + 4 + 8]


async def test_backoff_is_capped_at_30_seconds(autojump_clock: trio.testing.MockClock) -> None:
    script = Script([httpx.ConnectError] * 7 + [RESULT])
    await poll(script)
    gaps = [b[0] - a[0] for a, b in zip(script.polls, script.polls[1:], strict=False)]
    assert gaps == [1, 2, 4, 8, 16, 30, 30]


async def test_any_other_response_resets_the_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    busy = ok({}, status=429)
    script = Script([busy, busy, TRY_AGAIN, busy, RESULT])
    await poll(script)
    assert [p[0] for p in script.polls] == [0, 1, 3, 3, 4]


async def test_408_and_first_5xx_repoll_immediately_then_5xx_backs_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    e500 = ok({}, status=500)
    script = Script([ok({}, status=408), e500, e500, e500, e500, e500, RESULT])
    await poll(script)
    # 408, then three 5xx re-polled at once; the 4th and 5th 5xx wait 1 s and 2 s.
    assert [p[0] for p in script.polls] == [0, 0, 0, 0, 0, 1, 3]


async def test_bad_request_budget(autojump_clock: trio.testing.MockClock) -> None:
    bad = ok({"detail": "bad"}, status=400)
    script = Script([bad, bad, bad, RESULT])
    assert (await poll(script)).path
    with pytest.raises(BadRequestError):
        await poll(Script([bad] * 4))


async def test_408_resets_the_bad_request_budget(autojump_clock: trio.testing.MockClock) -> None:
    bad = ok({"detail": "bad"}, status=400)
    script = Script([bad, bad, bad, ok({}, status=408), bad, bad, bad, RESULT])
    assert (await poll(script)).path


async def test_billing_pause_then_billing_error(autojump_clock: trio.testing.MockClock) -> None:
    billing = ok({"detail": "pay"}, status=402)
    script = Script([billing, billing, RESULT])
    await poll(script)
    assert [p[0] for p in script.polls] == [0, 5, 10]
    script = Script([billing] * 100)
    with pytest.raises(BillingError):
        await poll(script, billing_pause_max=12.0)
    start = script.polls[0][0]
    assert [p[0] - start for p in script.polls] == [0, 5, 10, 15]


async def test_410_and_other_4xx_fail(autojump_clock: trio.testing.MockClock) -> None:
    with pytest.raises(GoneError):
        await poll(Script([ok({"detail": "expired"}, status=410)]))
    with pytest.raises(NotFoundError):
        await poll(Script([ok({"detail": "no such request"}, status=404)]))


async def test_complete_metadata_then_full_fetch(autojump_clock: trio.testing.MockClock) -> None:
    meta = ok({"status": "complete_metadata", "response_payload_size": 123})
    script = Script([meta, RESULT])
    await poll(script)
    assert [p[1]["allow_metadata_only"] for p in script.polls] == [True, False]
    with pytest.raises(APIError, match="complete_metadata twice"):
        await poll(Script([meta, meta]))


async def test_invalid_result_is_an_api_error(autojump_clock: trio.testing.MockClock) -> None:
    with pytest.raises(APIError, match="invalid result"):
        await poll(Script([ok({"not_path": 1})]))


async def test_api_future_result_timeout_caching_and_checkpoints(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fut: APIFuture[int] = APIFuture("Thing")

    async def work() -> int:
        await trio.sleep(5)
        return 42

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fut._run, work)
        with pytest.raises(ResultTimeoutError, match="Thing"):
            await fut.result(timeout=1)
        assert await fut == 42
        assert trio.current_time() == 5
    with trio.testing.assert_checkpoints():
        assert await fut.result() == 42
    assert "done" in repr(fut)


async def test_api_future_stores_request_errors_and_reports_closing() -> None:
    fut: APIFuture[int] = APIFuture("Thing")

    async def fail() -> int:
        raise RequestFailedError("nope", "r9", "server")

    await fut._run(fail)
    for _ in range(2):
        with pytest.raises(RequestFailedError):
            await fut

    pending: APIFuture[int] = APIFuture("Other")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pending._run, trio.sleep_forever)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    with pytest.raises(ClientClosedError, match="open_service"):
        await pending


async def test_sdk_bug_in_future_work_propagates() -> None:
    fut: APIFuture[int] = APIFuture("Thing")

    async def bug() -> int:
        raise KeyError("oops")

    with pytest.raises(KeyError):
        await fut._run(bug)
