"""open_service: session lifecycle, heartbeats, exception policy, nothing left running."""

from __future__ import annotations

import logging

import httpx
import pytest
import trio
import trio.testing
from _leaks import assert_nothing_left, holdings
from fake_tinker import FakeTinker

from tinkex_trio import Config, MissingAPIKeyError, ModelInput, open_service
from tinkex_trio.errors import ClientClosedError, InvalidInputError
from tinkex_trio.service import HEARTBEAT_INTERVAL


def config_for(fake: FakeTinker) -> Config:
    return Config(api_key=fake.api_key, base_url="http://fake", telemetry=False)


async def test_session_lifecycle_success(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeTinker()
    async with open_service(config_for(fake), transport=fake.mock_transport()) as service:
        assert service.session_id == "sess-1"
        await trio.sleep(3 * HEARTBEAT_INTERVAL + 1)
        assert fake.heartbeats == 3
    assert fake.finished == {"sess-1": "success"}
    assert fake.paths()[:3] == ["client/config", "client/dynamic_config", "create_session"]
    create = next(r for r in fake.requests if r.path.endswith("create_session"))
    assert create.body["type"] == "create_session" and create.body["tags"] == []
    assert fake.paths()[-1] == "sessions/sess-1/finish"
    assert fake.requests[-1].body == {"reason": {"type": "success"}, "detail": None}


async def test_nothing_outlives_the_block() -> None:
    fake = FakeTinker()
    before = holdings()
    async with open_service(config_for(fake), transport=fake.mock_transport()) as service:
        training = await service.create_lora_training_client("fake/model", rank=8)
        sampler = await service.create_sampling_client(base_model="fake/model")
        await training.optim_step()  # its poll is still running when the block ends
        await sampler.sample(ModelInput.from_ints([1]))
        # The service's own tasks (heartbeat, training sender, cancel queue) run meanwhile.
        assert len(holdings().tasks - before.tasks) >= 3
    assert_nothing_left(before)
    assert service._ctx.transport.is_closed
    with pytest.raises(ClientClosedError, match="open_service"):
        await training.optim_step()


async def test_user_error_finishes_as_errored_and_comes_out_unwrapped() -> None:
    fake = FakeTinker()
    with pytest.raises(ValueError, match="boom"):
        async with open_service(config_for(fake), transport=fake.mock_transport()):
            raise ValueError("boom")
    assert fake.finished == {"sess-1": "errored"}
    assert fake.requests[-1].body["detail"] == "ValueError"


async def test_cancellation_finishes_as_interrupted(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeTinker()
    with trio.move_on_after(25):
        async with open_service(config_for(fake), transport=fake.mock_transport()) as service:
            training = await service.create_lora_training_client("fake/model")
            fut = await training.optim_step()
            await fut
            await trio.sleep_forever()
    assert fake.finished == {"sess-1": "interrupted"}
    assert fake.heartbeats == 2


@pytest.mark.parametrize(
    ("cancel_at", "finished"),
    [
        # Before the session exists (each request takes 0.25 s: create_session answers at
        # 0.75 s), nothing is finished; after, the session is finished as interrupted.
        (0.0, {}),
        (0.5, {}),
        (5.0, {"sess-1": "interrupted"}),
        (10.0, {"sess-1": "interrupted"}),
        (10.5, {"sess-1": "interrupted"}),
    ],
)
async def test_cancel_at_any_point_leaves_nothing_running(
    autojump_clock: trio.testing.MockClock, cancel_at: float, finished: dict[str, str]
) -> None:
    fake = FakeTinker()
    fake.poll_try_again = 3

    async def slow(request: httpx.Request) -> httpx.Response:
        await trio.sleep(0.25)
        return await inner.handle_async_request(request)

    inner = fake.mock_transport()
    before = holdings()
    with trio.move_on_after(cancel_at):
        async with open_service(config_for(fake), transport=httpx.MockTransport(slow)) as svc:
            training = await svc.create_lora_training_client("fake/model")
            await (await training.optim_step())
            await trio.sleep_forever()
    assert_nothing_left(before)
    assert fake.finished == finished


async def test_sdk_task_bug_propagates(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    import tinkex_trio.service as service_module

    async def broken_heartbeat(*args: object, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        await trio.sleep(1)
        raise RuntimeError("bug in the heartbeat")

    monkeypatch.setattr(service_module, "_heartbeat", broken_heartbeat)
    fake = FakeTinker()
    with pytest.raises(RuntimeError, match="bug in the heartbeat"):
        async with open_service(config_for(fake), transport=fake.mock_transport()):
            await trio.sleep_forever()
    assert fake.finished == {"sess-1": "interrupted"}


async def test_user_error_wins_over_sdk_error(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    import tinkex_trio.service as service_module

    async def broken_heartbeat(*args: object, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        await trio.sleep(1)
        raise RuntimeError("bug")

    monkeypatch.setattr(service_module, "_heartbeat", broken_heartbeat)
    fake = FakeTinker()
    with pytest.raises(KeyError) as info:
        async with open_service(config_for(fake), transport=fake.mock_transport()):
            try:
                await trio.sleep_forever()
            finally:
                raise KeyError("user")
    assert isinstance(info.value.__context__, BaseExceptionGroup)


async def test_heartbeat_warns_after_120_s_and_stops_on_410(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeTinker()
    fake.faults["/api/v1/session_heartbeat"] = [503] * 12 + [410]
    caplog.set_level(logging.WARNING, logger="tinkex_trio.service")
    async with open_service(config_for(fake), transport=fake.mock_transport()):
        await trio.sleep(200)
    warnings = [r for r in caplog.records if "no successful heartbeat" in r.getMessage()]
    assert len(warnings) == 1
    beats = [r for r in fake.requests if r.path.endswith("session_heartbeat")]
    assert len(beats) == 13  # the 13th got 410, then the loop stopped


async def test_missing_api_key_says_how_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    with pytest.raises(MissingAPIKeyError, match="TINKER_API_KEY"):
        async with open_service(base_url="http://127.0.0.1:1"):
            pass


async def test_bad_input_is_rejected_before_sending() -> None:
    fake = FakeTinker()
    async with open_service(config_for(fake), transport=fake.mock_transport()) as service:
        sent = len(fake.requests)
        with pytest.raises(InvalidInputError, match="rank"):
            await service.create_lora_training_client("fake/model", rank=0)
        with pytest.raises(InvalidInputError, match="base_model"):
            await service.create_lora_training_client("")
        with pytest.raises(InvalidInputError, match="tinker"):
            await service.create_training_client_from_state("not-a-path")
        with pytest.raises(InvalidInputError, match="exactly one"):
            await service.create_sampling_client()
        assert len(fake.requests) == sent


async def test_clients_created_concurrently_get_distinct_seq_ids() -> None:
    fake = FakeTinker()
    ids: list[str] = []
    async with open_service(config_for(fake), transport=fake.mock_transport()) as service:

        async def make() -> None:
            client = await service.create_lora_training_client("fake/model")
            ids.append(client.model_id)

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(make)
    assert sorted(ids) == [f"sess-1:train:{i}" for i in range(5)]


async def test_create_training_client_from_state_names_the_model() -> None:
    fake = FakeTinker()
    async with open_service(config_for(fake), transport=fake.mock_transport()) as service:
        await service.create_lora_training_client("fake/model")
        client = await service.create_training_client_from_state_with_optimizer(
            "tinker://sess-1:train:0/weights/a"
        )
        assert client.model_id == "sess-1:train:1"
        load = next(r for r in fake.requests if r.path.endswith("load_weights"))
        assert load.body["session_id"] == "sess-1" and load.body["model_seq_id"] == 1
        assert load.body["optimizer"] is True
        fut = await client.optim_step()
        await fut
        assert fake.submitted_seq_ids["sess-1:train:1"] == [1]


async def test_tinker_log_turns_on_sdk_logging(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeTinker()
    caplog.set_level(logging.DEBUG, logger="tinkex_trio")
    config = Config(api_key=fake.api_key, base_url="http://fake", log_level="debug")
    async with open_service(config, transport=fake.mock_transport()):
        pass
    lines = [r.getMessage() for r in caplog.records if r.name == "tinkex_trio"]
    assert any(line.startswith("RequestStarted") for line in lines)
    assert all(fake.api_key not in line for line in lines)


@pytest.mark.parametrize("seed", range(8))
async def test_cancel_at_random_points_over_sockets_closes_every_connection(seed: int) -> None:
    """Real sockets: whatever point the block is cancelled at, no connection stays open."""
    import random

    from fault_server import open_fault_server

    fake = FakeTinker()
    fake.poll_try_again = 2
    cancel_after = random.Random(seed).uniform(0.0, 0.15)
    entered = False
    with trio.fail_after(30):
        async with open_fault_server(fake.fault_handler) as server:
            config = Config(api_key=fake.api_key, base_url=server.base_url, telemetry=False)
            before = holdings()
            with trio.move_on_after(cancel_after):
                async with open_service(config) as service:
                    entered = True
                    training = await service.create_lora_training_client("fake/model")
                    sampler = await service.create_sampling_client(base_model="fake/model")
                    async with trio.open_nursery() as work:
                        for i in range(20):
                            work.start_soon(sampler.sample, ModelInput.from_ints([i]))
                            work.start_soon(training.optim_step)
                    await trio.sleep_forever()
            # The client closed its pool; give the server time to notice every close (a socket
            # the client kept open keeps its server side open too, and the check below fails).
            with trio.move_on_after(5):
                while server.open_connections:  # noqa: ASYNC110 - the server offers no event
                    await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()  # the server's handlers finish closing
            # Every task and socket of the service (and of the server's connections) is gone.
            assert_nothing_left(before)
    # A session the block saw is finished as interrupted; one it never saw, not at all.
    assert fake.finished == ({"sess-1": "interrupted"} if entered else {})


async def test_heartbeat_cadence_does_not_drift_with_slow_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeTinker()
    inner = fake.mock_transport()
    beats: list[float] = []

    async def slow_heartbeats(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("session_heartbeat"):
            beats.append(trio.current_time())
            await trio.sleep(3)
        return await inner.handle_async_request(request)

    async with open_service(config_for(fake), transport=httpx.MockTransport(slow_heartbeats)):
        start = trio.current_time()
        await trio.sleep(45)
    assert [round(b - start) for b in beats] == [10, 20, 30, 40]


async def test_a_request_queued_after_the_sender_ended_fails_as_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The race of a task first run in a cancelled scope: the service's tasks have ended, the
    block has not, and a training call queues a request. Its future fails as closed; nothing
    escapes as `BrokenResourceError`. (The shield stands for the stretch a newly started task
    runs before its first checkpoint.)"""
    fake = FakeTinker()
    outcome: list[BaseException] = []
    with trio.CancelScope() as outer:
        async with open_service(config_for(fake), transport=fake.mock_transport()) as service:
            training = await service.create_lora_training_client("fake/model")
            outer.cancel()
            with trio.CancelScope(shield=True):
                await trio.testing.wait_all_tasks_blocked()  # the sender task has ended
                future = await training.optim_step()
                try:
                    await future
                except ClientClosedError as exc:
                    outcome.append(exc)
    [closed] = outcome
    assert "closed before this request was submitted" in str(closed)
