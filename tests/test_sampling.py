"""SamplingClient: fan-out, the shared 429 window, retries, timeouts (virtual time + sockets)."""

from __future__ import annotations

import json
import random
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from fake_tinker import FakeTinker
from fault_server import open_fault_server

from tinkex_trio import Config, ModelInput, SamplingParams, open_service
from tinkex_trio._dispatch import (
    MAX_CONCURRENT_SUBMITS,
    MAX_CONCURRENT_SUBMITS_BACKING_OFF,
    RateLimiter,
)
from tinkex_trio.errors import (
    BadRequestError,
    InvalidInputError,
    RequestFailedError,
    ResultTimeoutError,
)


def config_for(fake: FakeTinker, base_url: str = "http://fake") -> Config:
    return Config(api_key=fake.api_key, base_url=base_url, telemetry=False)


async def test_sample_golden_request_and_sequence_ids() -> None:
    fake = FakeTinker()
    async with open_service(config_for(fake), transport=fake.mock_transport()) as service:
        sampler = await service.create_sampling_client(base_model="fake/model")
        result = await sampler.sample(
            ModelInput.from_ints([5, 6]),
            num_samples=2,
            sampling_params=SamplingParams(max_tokens=3, seed=1, stop=[]),
            include_prompt_logprobs=True,
        )
        logprobs = await sampler.compute_logprobs(ModelInput.from_ints([1, 2, 3]))
    assert [s.tokens for s in result.sequences] == [[6], [7]]
    assert [s.sequence_id for s in result.sequences] == ["seq-0", "seq-1"]
    assert result.prompt_logprobs == [None, -2.0]
    assert logprobs == [None, -2.0, -2.0]
    submits = [r for r in fake.requests if r.path.endswith("asample")]
    assert submits[0].headers["x-tinker-sampling-backpressure"] == "1"
    assert submits[0].body["sampling_params"] == {
        "max_tokens": 3,
        "seed": 1,
        "stop": [],
        "temperature": 1.0,
        "top_k": -1,
        "top_p": 1.0,
    }
    assert submits[1].body["sampling_params"]["max_tokens"] == 1
    assert [r.body["seq_id"] for r in submits] == [0, 1]


async def test_429_opens_a_window_for_every_caller(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeTinker()
    fake.faults["/api/v1/asample"] = [429]
    times: list[float] = []
    inner = fake.mock_transport()

    async def timed(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("asample"):
            times.append(trio.current_time())
        return await inner.handle_async_request(request)

    async with open_service(config_for(fake), transport=httpx.MockTransport(timed)) as service:
        sampler = await service.create_sampling_client(base_model="fake/model")
        first = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sampler.sample, ModelInput.from_ints([1]))
            await trio.sleep(0.1)  # the first submit got its 429; the window is open
            for _ in range(4):
                nursery.start_soon(sampler.sample, ModelInput.from_ints([1]))
    relative = sorted(round(x - first, 6) for x in times)
    # One submit got the 429 at t=0; everything after it waited out the 1 s window.
    assert relative[0] == 0 and relative[1:] == [1.0] * 5
    # The 429'd call was resubmitted with the same seq_id.
    seqs = [r.body["seq_id"] for r in fake.requests if r.path.endswith("asample")]
    assert seqs[0] == 0 and sorted(seqs) == [0, 0, 1, 2, 3, 4]


async def test_410_on_poll_retries_the_whole_call_with_a_new_seq_id(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeTinker()
    fake.faults["/api/v1/retrieve_future"] = [410]
    async with open_service(config_for(fake), transport=fake.mock_transport()) as service:
        sampler = await service.create_sampling_client(base_model="fake/model")
        result = await sampler.sample(ModelInput.from_ints([9]))
        assert sampler.statistics().retries == 1
    assert result.sequences[0].tokens == [9]
    assert fake.sample_seq_ids == [0, 1]


async def test_5xx_on_submit_retries_with_backoff(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeTinker()
    fake.faults["/api/v1/asample"] = [503, 503]
    async with open_service(config_for(fake), transport=fake.mock_transport()) as service:
        sampler = await service.create_sampling_client(base_model="fake/model")
        service._ctx.transport.random = random.Random(0)  # the layer-D jitter
        start = trio.current_time()
        await sampler.sample(ModelInput.from_ints([1]))
        elapsed = trio.current_time() - start
    # Two retries: 0.5 s and 1 s, each within +-25 %.
    assert 0.75 * 1.5 <= elapsed <= 1.25 * 1.5
    assert [r.body["seq_id"] for r in fake.requests if r.path.endswith("asample")] == [0, 1, 2]


async def test_failures_that_are_not_retryable_propagate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeTinker()
    fake.faults["/api/v1/asample"] = [400]
    async with open_service(config_for(fake), transport=fake.mock_transport()) as service:
        sampler = await service.create_sampling_client(base_model="fake/model")
        with pytest.raises(BadRequestError):
            await sampler.sample(ModelInput.from_ints([1]))
        original = fake.handle

        def failing(method: str, path: str, headers: dict[str, str], raw: bytes) -> Any:
            if path.endswith("retrieve_future"):
                return 200, {}, b'{"error": "prompt too long", "category": "user"}'
            return original(method, path, headers, raw)

        fake.handle = failing  # type: ignore[method-assign]
        with pytest.raises(RequestFailedError) as info:
            await sampler.sample(ModelInput.from_ints([1]))
        assert info.value.category == "user"


async def test_timeout_bounds_the_whole_call(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeTinker()
    fake.poll_try_again = 10**9
    inner = fake.mock_transport()

    async def slow_polls(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("retrieve_future"):
            await trio.sleep(1)
        return await inner.handle_async_request(request)

    async with open_service(config_for(fake), transport=httpx.MockTransport(slow_polls)) as svc:
        sampler = await svc.create_sampling_client(base_model="fake/model")
        start = trio.current_time()
        with pytest.raises(ResultTimeoutError):
            await sampler.sample(ModelInput.from_ints([1]), timeout=7.5)
        assert trio.current_time() - start == pytest.approx(7.5)


async def test_invalid_sampling_input_is_rejected_before_sending() -> None:
    fake = FakeTinker()
    async with open_service(config_for(fake), transport=fake.mock_transport()) as service:
        sampler = await service.create_sampling_client(base_model="fake/model")
        sent = len(fake.requests)
        with pytest.raises(InvalidInputError, match="empty"):
            await sampler.sample(ModelInput.from_ints([]))
        with pytest.raises(InvalidInputError, match="num_samples"):
            await sampler.sample(ModelInput.from_ints([1]), num_samples=0)
        with pytest.raises(InvalidInputError, match="ModelInput"):
            await sampler.sample([1, 2])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="top_p"):
            SamplingParams(top_p=0)
        assert len(fake.requests) == sent


async def test_2000_concurrent_samples_with_some_429_over_real_sockets() -> None:
    fake = FakeTinker()
    rng = random.Random(11)
    fake.faults["/api/v1/asample"] = [429 if rng.random() < 0.05 else None for _ in range(2500)]
    results: list[int] = []
    with trio.fail_after(120):
        async with open_fault_server(fake.fault_handler) as server:
            async with open_service(config_for(fake, server.base_url)) as service:
                sampler = await service.create_sampling_client(base_model="fake/model")

                async def one(i: int) -> None:
                    response = await sampler.sample(ModelInput.from_ints([i]))
                    results.append(response.sequences[0].tokens[0])

                async with trio.open_nursery() as nursery:
                    for i in range(2000):
                        nursery.start_soon(one, i)
                stats = service._ctx.rate_limiter.statistics()
    assert sorted(results) == list(range(2000))
    assert stats.rate_limited_total > 0


async def test_rate_limiter_limits_concurrency_while_backing_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter()
    peak = 0
    active = 0

    async def submit() -> None:
        nonlocal peak, active
        async with limiter.dispatch(10):
            active += 1
            peak = max(peak, active)
            await trio.sleep(0.5)
            active -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(1000):
            nursery.start_soon(submit)
    assert peak == MAX_CONCURRENT_SUBMITS

    limiter.on_rate_limited()
    assert limiter.statistics().backing_off
    peak = 0
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(submit)
    assert peak == MAX_CONCURRENT_SUBMITS_BACKING_OFF
    assert trio.current_time() - start >= 1.0
    limiter.on_success()
    assert not limiter.statistics().backing_off


async def test_samples_survive_drops_410_and_slow_polls_over_real_sockets() -> None:
    """Dropped connections on submits and polls, a 410, slow polls: every call completes."""
    from fault_server import Reply

    fake = FakeTinker()
    results: list[int] = []
    with trio.fail_after(60):
        async with open_fault_server(fake.fault_handler) as server:
            server.script(
                "POST",
                "/api/v1/asample",
                Reply.drop_connection("before_response"),
                Reply.drop_connection("reset"),
            )
            server.script(
                "POST",
                "/api/v1/retrieve_future",
                Reply(
                    body=b'{"type": "try_again", "request_id": "r", "queue_state": "active"}',
                    drop="mid_body",
                ),
                Reply(status=410, body=b'{"detail": "expired"}'),
                Reply(status=503, body=b'{"detail": "busy"}', delay=0.2),
                Reply(
                    body=b'{"type": "try_again", "request_id": "r", "queue_state": "active"}',
                    drop="after_headers",
                ),
            )
            async with open_service(config_for(fake, server.base_url)) as service:
                sampler = await service.create_sampling_client(base_model="fake/model")

                async def one(i: int) -> None:
                    response = await sampler.sample(ModelInput.from_ints([i]))
                    results.append(response.sequences[0].tokens[0])

                async with trio.open_nursery() as nursery:
                    for i in range(50):
                        nursery.start_soon(one, i)
                retries = sampler.statistics().retries
    assert sorted(results) == list(range(50))
    assert retries >= 1  # at least the 410 made a whole call start again


def _watched(fake: FakeTinker, answer: Any) -> tuple[httpx.MockTransport, list[float]]:
    """A transport over `fake` whose `retrieve_futures` (PROTOCOL.md 4.8) is `answer(body)`."""
    inner = fake.mock_transport()
    polls: list[float] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/retrieve_futures"):
            polls.append(trio.current_time())
            return answer(json.loads(await request.aread()))
        return await inner.handle_async_request(request)

    return httpx.MockTransport(handle), polls


async def test_session_wide_polling_retries_each_second_then_wakes_the_sample(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeTinker()
    fake.client_config = {"sample_use_retrieve_futures": True}
    fake.poll_try_again = 10**6  # a sample's own retrieve_future would never see its result
    answers = iter([503, 503])

    def answer(body: dict[str, Any]) -> httpx.Response:
        status = next(answers, None)
        if status is not None:
            return httpx.Response(status, json={"detail": "busy"})
        fake._pending_polls[fake.sample_request_ids[0]] = 0  # finished now
        done = [{"request_id": fake.sample_request_ids[0], "state": "finished"}]
        return httpx.Response(200, json={"completions": done, "cursor": 1})

    transport, polls = _watched(fake, answer)
    async with open_service(config_for(fake), transport=transport) as service:
        sampler = await service.create_sampling_client(base_model="fake/model")
        start = trio.current_time()
        result = await sampler.sample(ModelInput.from_ints([4]))
    assert result.sequences[0].tokens == [4]
    # The long-poll policy: transient answers retried every 1 s (PROTOCOL.md 4.8).
    assert [p - start for p in polls] == [0, 1, 2, 2]  # the last: acknowledgement only
    assert fake.paths().count("retrieve_future") == 1


async def test_session_wide_polling_stops_with_its_last_waiter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeTinker()
    fake.client_config = {"sample_use_retrieve_futures": True}
    transport, polls = _watched(fake, lambda body: httpx.Response(503, json={"detail": "busy"}))
    async with open_service(config_for(fake), transport=transport) as service:
        sampler = await service.create_sampling_client(base_model="fake/model")
        start = trio.current_time()
        with pytest.raises(ResultTimeoutError):
            await sampler.sample(ModelInput.from_ints([1]), timeout=2.5)
        await trio.sleep(60)
    # Retried while the sample waited; nothing once it left at 2.5 s.
    assert [p - start for p in polls] == [0, 1, 2]


async def test_a_broken_session_wide_poll_falls_back_to_per_sample_polls(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeTinker()
    fake.client_config = {"sample_use_retrieve_futures": True}
    transport, polls = _watched(fake, lambda body: httpx.Response(404, json={"detail": "no"}))
    async with open_service(config_for(fake), transport=transport) as service:
        sampler = await service.create_sampling_client(base_model="fake/model")
        first = await sampler.sample(ModelInput.from_ints([5]))
        second = await sampler.sample(ModelInput.from_ints([6]))
    assert [first.sequences[0].tokens, second.sequences[0].tokens] == [[5], [6]]
    assert len(polls) == 1  # broken for good after the 404
    assert fake.paths().count("retrieve_future") == 2


async def test_rate_limiter_wakes_one_waiter_per_released_slot_in_arrival_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A released slot goes to the first waiter, and only that waiter runs: no stampede of
    every waiter re-checking the limit (issue 12: one waiter woken instead of all)."""
    limiter = RateLimiter()
    releases = [trio.Event() for _ in range(MAX_CONCURRENT_SUBMITS)]
    order: list[int] = []
    waiter_steps: list[str] = []

    class CountSteps(trio.abc.Instrument):
        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            if task.name.startswith("waiter-"):
                waiter_steps.append(task.name)

    async def holder(i: int) -> None:
        async with limiter.dispatch(1):
            await releases[i].wait()

    async def waiter(i: int) -> None:
        async with limiter.dispatch(1):
            order.append(i)
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        for i in range(MAX_CONCURRENT_SUBMITS):
            nursery.start_soon(holder, i)
        await trio.testing.wait_all_tasks_blocked()
        for i in range(5):
            nursery.start_soon(waiter, i, name=f"waiter-{i}")
            await trio.testing.wait_all_tasks_blocked()
        assert limiter.statistics().in_flight == MAX_CONCURRENT_SUBMITS and order == []
        trio.lowlevel.add_instrument(instrument := CountSteps())
        try:
            for k in range(3):
                waiter_steps.clear()
                releases[k].set()
                await trio.testing.wait_all_tasks_blocked()
                assert set(waiter_steps) == {f"waiter-{k}"}  # the others never ran
                assert order == list(range(k + 1))
                assert limiter.statistics().in_flight == MAX_CONCURRENT_SUBMITS
        finally:
            trio.lowlevel.remove_instrument(instrument)
        nursery.cancel_scope.cancel()
    assert limiter.statistics().in_flight == 0
