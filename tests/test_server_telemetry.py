"""Telemetry to the server (PROTOCOL.md 3.1): what `Config.telemetry` turns on, and its bounds."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
import trio.testing
from fake_tinker import FakeTinker

from tinkex_trio import Config, open_service
from tinkex_trio._server_telemetry import FLUSH_INTERVAL, MAX_BATCH, MAX_QUEUED, ServerTelemetry
from tinkex_trio._transport import Transport
from tinkex_trio.errors import RequestFailedError
from tinkex_trio.telemetry import Event, RequestFinished, Telemetry


def config_for(fake: FakeTinker, *, telemetry: bool = True) -> Config:
    return Config(api_key=fake.api_key, base_url="http://fake", telemetry=telemetry)


def events(fake: FakeTinker) -> list[dict[str, object]]:
    return [event for batch in fake.telemetry_batches for event in batch["events"]]


async def test_session_start_is_sent_within_one_flush_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeTinker()
    async with open_service(config_for(fake), transport=fake.mock_transport()):
        await trio.sleep(FLUSH_INTERVAL - 0.5)
        assert fake.telemetry_batches == []
        await trio.sleep(1.0)
        [batch] = fake.telemetry_batches
    assert batch["session_id"] == "sess-1" and batch["sdk_version"]
    assert isinstance(batch["process_uuid"], str) and batch["platform"]
    [start] = batch["events"]
    assert start["event"] == "SESSION_START" and start["severity"] == "INFO"
    assert start["event_session_index"] == 0 and start["timestamp"].endswith("Z")
    # A normal close sends nothing more (SESSION_END goes only with a failure, 3.1).
    assert [e["event"] for e in events(fake)] == ["SESSION_START"]


async def test_a_failing_block_reports_the_exception_and_the_session_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeTinker()
    with pytest.raises(ValueError, match="boom"):
        async with open_service(config_for(fake), transport=fake.mock_transport()):
            await trio.sleep(12.25)
            raise ValueError("boom")
    start, failure, end = events(fake)
    assert start["event"] == "SESSION_START"
    assert failure["event"] == "UNHANDLED_EXCEPTION" and failure["severity"] == "ERROR"
    assert failure["error_type"] == "ValueError" and failure["error_message"] == "boom"
    assert 'raise ValueError("boom")' in str(failure["traceback"])
    assert end["event"] == "SESSION_END" and end["duration"] == "0:00:12.250000"
    assert [e["event_session_index"] for e in (start, failure, end)] == [0, 1, 2]
    # The finish goes first; the final telemetry flush after it.
    assert fake.paths()[-2:] == ["sessions/sess-1/finish", "telemetry"]


async def test_a_user_error_is_reported_as_a_warning(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeTinker()
    with pytest.raises(RequestFailedError):
        async with open_service(config_for(fake), transport=fake.mock_transport()):
            raise RequestFailedError("bad prompt", "req-1", "user")
    failure = next(e for e in events(fake) if e["event"] == "UNHANDLED_EXCEPTION")
    assert failure["severity"] == "WARNING" and failure["error_type"] == "RequestFailedError"


async def test_off_sends_nothing(autojump_clock: trio.testing.MockClock) -> None:
    fake = FakeTinker()
    with pytest.raises(ValueError):
        async with open_service(config_for(fake, telemetry=False), transport=fake.mock_transport()):
            await trio.sleep(5 * FLUSH_INTERVAL)
            raise ValueError("boom")
    assert "telemetry" not in fake.paths() and fake.telemetry_batches == []


async def test_a_server_without_the_endpoint_costs_no_warning(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeTinker()
    fake.telemetry_route = False
    caplog.set_level(logging.DEBUG, logger="tinkex_trio")
    async with open_service(config_for(fake), transport=fake.mock_transport()):
        await trio.sleep(3 * FLUSH_INTERVAL)
    assert fake.paths().count("telemetry") == 1  # one batch, dropped; nothing left to send
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    dropped = [r for r in caplog.records if "telemetry batch dropped" in r.getMessage()]
    assert len(dropped) == 1 and dropped[0].levelno == logging.DEBUG


async def test_batches_hold_at_most_max_batch_events(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeTinker()
    transport = Transport(config_for(fake), transport=fake.mock_transport(), telemetry=Telemetry())
    try:
        report = ServerTelemetry(transport, "sess-9")
        for _ in range(2 * MAX_BATCH + 50):
            report.heartbeat_failing(120.0)
        await report.flush()
    finally:
        await transport.aclose()
    assert [len(b["events"]) for b in fake.telemetry_batches] == [MAX_BATCH, MAX_BATCH, 50]
    indexes = [e["event_session_index"] for e in events(fake)]
    assert indexes == list(range(2 * MAX_BATCH + 50))
    assert events(fake)[0]["event_name"] == "session_heartbeat_failing"


async def test_the_queue_is_bounded_and_counts_what_it_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = FakeTinker()
    transport = Transport(config_for(fake), transport=fake.mock_transport(), telemetry=Telemetry())
    try:
        report = ServerTelemetry(transport, "sess-9")
        for _ in range(MAX_QUEUED + 5):
            report.heartbeat_failing(120.0)
        assert report.dropped == 5
        await report.flush()
    finally:
        await transport.aclose()
    assert len(events(fake)) == MAX_QUEUED


async def test_the_local_backend_accepts_the_batches(tmp_path: Path) -> None:
    pytest.importorskip("hypercorn")
    from tinkex_trio.local import open_local_backend
    from tinkex_trio.local.testing import FakeEngine

    answers: list[int] = []

    def watch(event: Event) -> None:
        if isinstance(event, RequestFinished) and event.path == "/api/v1/telemetry":
            answers.append(event.status)

    hub = Telemetry()
    hub.add_handler(watch)
    with trio.fail_after(30):
        async with open_local_backend(data_dir=tmp_path, engine=FakeEngine()) as backend:
            with pytest.raises(ValueError):
                async with open_service(
                    base_url=backend.base_url, api_key=backend.api_key, telemetry_hub=hub
                ):
                    raise ValueError("boom")
    assert answers == [200]
