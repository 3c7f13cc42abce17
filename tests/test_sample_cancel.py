"""Dynamic config (PROTOCOL.md 2.1 step 3) and server-side cancel of abandoned samples (4.9).

Virtual time over `FakeTinker.mock_transport()` (no I/O, so `autojump_clock` is valid). Polls
and cancels are made slow by a wrapping transport that sleeps in trio time.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from _leaks import assert_nothing_left, holdings
from fake_tinker import FakeTinker

from tinkex_trio import Config, ModelInput, open_service
from tinkex_trio._dynamic import CANCEL_FLUSH_TIMEOUT, MIN_REFRESH_INTERVAL
from tinkex_trio._policy import DYNAMIC_CONFIG_TIMEOUT
from tinkex_trio.errors import ResultTimeoutError
from tinkex_trio.types import DynamicConfigResponse

CANCEL_ON: dict[str, Any] = {"sample_cancel_enabled": True, "sample_cancel_max_batch_size": 4}


def config_for(fake: FakeTinker) -> Config:
    return Config(api_key=fake.api_key, base_url="http://fake", telemetry=False)


def delayed(
    fake: FakeTinker, delays: dict[str, float]
) -> tuple[httpx.MockTransport, list[tuple[float, str]]]:
    """A transport over `fake` that sleeps `delays[route]` before answering; logs (time, route)."""
    inner = fake.mock_transport()
    log: list[tuple[float, str]] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        route = request.url.path.removeprefix("/api/v1/")
        log.append((trio.current_time(), route))
        await trio.sleep(delays.get(route, 0.0))
        return await inner.handle_async_request(request)

    return httpx.MockTransport(handle), log


def times_of(log: list[tuple[float, str]], route: str) -> list[float]:
    return [when for when, r in log if r == route]


async def _abandon_samples(sampler: Any, n: int, timeout: float) -> None:
    async def one() -> None:
        with pytest.raises(ResultTimeoutError):
            await sampler.sample(ModelInput.from_ints([1]), timeout=timeout)

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)


# -- dynamic config ---------------------------------------------------------------------------


async def test_dynamic_config_is_fetched_then_refreshed_on_its_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeTinker()
    fake.dynamic_config = {"refresh_interval_sec": 30, "sample_cancel_enabled": True}
    transport, log = delayed(fake, {})
    async with open_service(config_for(fake), transport=transport) as service:
        start = trio.current_time()
        flags = service._ctx.dynamic_config
        assert flags.value.sample_cancel_enabled and flags.value.refresh_interval_sec == 30
        fake.dynamic_config = {"refresh_interval_sec": 1, "sample_cancel_enabled": False}
        await trio.sleep(95)
        # 30 s after start, then every max(1, 10) s: the server lowered the interval.
        assert times_of(log, "client/dynamic_config") == [
            0.0,
            start + 30,
            start + 30 + MIN_REFRESH_INTERVAL * 1,
            *(start + 30 + MIN_REFRESH_INTERVAL * k for k in range(2, 7)),
        ]
        assert not flags.value.sample_cancel_enabled
        # A failed refresh keeps the last good values.
        fake.faults["/api/v1/client/dynamic_config"] = [500]
        await trio.sleep(MIN_REFRESH_INTERVAL)
        assert flags.value.refresh_interval_sec == 1
    body = next(r.body for r in fake.requests if r.path.endswith("dynamic_config"))
    assert set(body) == {"sdk_version"}


async def test_a_server_without_dynamic_config_costs_one_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeTinker()  # client/dynamic_config answers 404
    async with open_service(config_for(fake), transport=fake.mock_transport()) as service:
        assert trio.current_time() == 0.0
        assert service.dynamic_config == DynamicConfigResponse()
        await trio.sleep(3600)
    assert fake.paths().count("client/dynamic_config") == 1


@pytest.mark.parametrize("fault", ["status", "hang"])
async def test_a_failing_dynamic_config_does_not_stop_or_slow_start_up(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="tinkex_trio.service")
    fake = FakeTinker()
    fake.dynamic_config = CANCEL_ON
    if fault == "status":
        fake.faults["/api/v1/client/dynamic_config"] = [503]
        transport, _ = delayed(fake, {})
    else:
        transport, _ = delayed(fake, {"client/dynamic_config": 1000.0})
    async with open_service(config_for(fake), transport=transport) as service:
        # One attempt (no retries), bounded by the 10 s fetch timeout.
        assert trio.current_time() <= DYNAMIC_CONFIG_TIMEOUT
        assert fake.paths().count("client/dynamic_config") <= 1
        assert service._ctx.dynamic_config.value.sample_cancel_enabled is False
    assert any("dynamic_config" in r.getMessage() for r in caplog.records)


# -- cancelling abandoned samples -------------------------------------------------------------


async def test_timed_out_samples_are_cancelled_in_batches(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeTinker()
    fake.dynamic_config = CANCEL_ON
    fake.poll_try_again = 10**6  # results never come
    transport, log = delayed(fake, {"retrieve_future": 1.0, "cancel_future": 1.0})
    async with open_service(config_for(fake), transport=transport) as service:
        sampler = await service.create_sampling_client(base_model="fake/model")
        start = trio.current_time()
        await _abandon_samples(sampler, 10, timeout=5.0)
        # The callers did not wait for any cancel to be sent.
        assert trio.current_time() == start + 5.0
        await trio.sleep(10)
        assert sorted(fake.cancelled) == sorted(fake.sample_request_ids)
        assert len(fake.cancelled) == 10
        # Batches of at most 4 sent in parallel, one batch after the other.
        sends = times_of(log, "cancel_future")
        assert [sends.count(when) for when in sorted(set(sends))] == [4, 4, 2]
        assert service._ctx.sample_canceller.sent == 10
    assert fake.paths()[-1] == "sessions/sess-1/finish"


async def test_a_cancel_scope_and_compute_logprobs_abandon_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeTinker()
    fake.dynamic_config = CANCEL_ON
    fake.poll_try_again = 10**6
    transport, _ = delayed(fake, {"retrieve_future": 1.0})
    async with open_service(config_for(fake), transport=transport) as service:
        sampler = await service.create_sampling_client(base_model="fake/model")
        with trio.move_on_after(3):
            await sampler.compute_logprobs(ModelInput.from_ints([1, 2]))
        with trio.move_on_after(3):
            await sampler.sample(ModelInput.from_ints([1]))
        await trio.sleep(1)
        assert fake.cancelled == fake.sample_request_ids and len(fake.cancelled) == 2


async def test_finished_and_failed_samples_are_not_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeTinker()
    fake.dynamic_config = CANCEL_ON
    async with open_service(config_for(fake), transport=fake.mock_transport()) as service:
        sampler = await service.create_sampling_client(base_model="fake/model")
        await sampler.sample(ModelInput.from_ints([1]))
        # Cancelled before the submit: nothing to cancel on the server.
        fake.faults["/api/v1/asample"] = [429] * 100
        with trio.move_on_after(0.1):
            await sampler.sample(ModelInput.from_ints([1]))
        await trio.sleep(60)
    assert fake.cancelled == []
    assert "cancel_future" not in fake.paths()


async def test_nothing_is_sent_when_the_flag_is_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeTinker()
    fake.dynamic_config = {"sample_cancel_enabled": False}
    fake.poll_try_again = 10**6
    transport, _ = delayed(fake, {"retrieve_future": 1.0})
    async with open_service(config_for(fake), transport=transport) as service:
        sampler = await service.create_sampling_client(base_model="fake/model")
        await _abandon_samples(sampler, 5, timeout=2.0)
        await trio.sleep(60)
    assert "cancel_future" not in fake.paths()


async def test_samples_abandoned_by_the_closing_service_are_flushed_before_finish(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeTinker()
    fake.dynamic_config = CANCEL_ON
    fake.poll_try_again = 10**6
    transport, _ = delayed(fake, {"retrieve_future": 1.0})
    with trio.move_on_after(5):
        async with open_service(config_for(fake), transport=transport) as service:
            sampler = await service.create_sampling_client(base_model="fake/model")
            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(sampler.sample, ModelInput.from_ints([i + 1]))
                await trio.sleep_forever()
    assert sorted(fake.cancelled) == sorted(fake.sample_request_ids)
    assert len(fake.cancelled) == 6
    paths = fake.paths()
    assert paths[-1] == "sessions/sess-1/finish"
    assert max(i for i, p in enumerate(paths) if p == "cancel_future") < len(paths) - 1
    assert fake.finished == {"sess-1": "interrupted"}


@pytest.mark.parametrize(
    ("cancel_delay", "sends", "all_cancelled"),
    [
        # The server never answers: the flush gives up at its bound, nothing was cancelled.
        (1000.0, 6, False),
        # Cut short in the drain, sent again by the flush: every id reached the server.
        (0.5, 6, True),
    ],
    ids=["hanging-server", "drain-cut-short"],
)
async def test_the_exit_flush_is_bounded(
    autojump_clock: trio.testing.MockClock, cancel_delay: float, sends: int, all_cancelled: bool
) -> None:
    fake = FakeTinker()
    fake.dynamic_config = CANCEL_ON
    fake.poll_try_again = 10**6
    transport, log = delayed(fake, {"retrieve_future": 1.0, "cancel_future": cancel_delay})
    before = holdings()
    async with open_service(config_for(fake), transport=transport) as service:
        sampler = await service.create_sampling_client(base_model="fake/model")
        await _abandon_samples(sampler, 3, timeout=2.0)
        await trio.sleep(0.1)
        # The block ends while the drain task's cancels are in flight.
        assert len(times_of(log, "cancel_future")) == 3
        closing = trio.current_time()
    assert_nothing_left(before)
    assert trio.current_time() - closing <= CANCEL_FLUSH_TIMEOUT + 0.01
    assert fake.finished == {"sess-1": "success"}
    assert len(times_of(log, "cancel_future")) == sends
    expected = sorted(fake.sample_request_ids) if all_cancelled else []
    assert sorted(fake.cancelled) == expected
