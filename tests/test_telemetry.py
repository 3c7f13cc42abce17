"""The telemetry hub: delivery, removal, handler isolation, logging, encoding."""

from __future__ import annotations

import logging

import msgspec
import pytest

from tinkex_trio.telemetry import (
    Event,
    FutureCompleted,
    QueueStateChanged,
    RequestFailed,
    RequestFinished,
    RequestStarted,
    RetryScheduled,
    SessionEvent,
    Telemetry,
)

STARTED = RequestStarted(method="POST", path="/api/v1/x", attempt=0)


def test_emit_without_handlers_is_a_no_op() -> None:
    hub = Telemetry()
    assert not hub.active
    hub.emit(STARTED)


def test_handlers_receive_events_in_order_and_can_be_removed() -> None:
    hub = Telemetry()
    seen: list[tuple[str, Event]] = []
    remove_a = hub.add_handler(lambda e: seen.append(("a", e)))
    hub.add_handler(lambda e: seen.append(("b", e)))
    assert hub.active
    hub.emit(STARTED)
    assert seen == [("a", STARTED), ("b", STARTED)]
    remove_a()
    remove_a()  # idempotent
    hub.emit(STARTED)
    assert seen[-1] == ("b", STARTED) and len(seen) == 3


def test_a_raising_handler_is_logged_and_isolated(caplog: pytest.LogCaptureFixture) -> None:
    hub = Telemetry()
    seen: list[Event] = []

    def bad(event: Event) -> None:
        raise RuntimeError("boom")

    hub.add_handler(bad)
    hub.add_handler(seen.append)
    with caplog.at_level(logging.ERROR, logger="tinkex_trio.telemetry"):
        hub.emit(STARTED)
    assert seen == [STARTED]
    assert any("RequestStarted" in r.getMessage() for r in caplog.records)


def test_handler_may_remove_itself_during_emit() -> None:
    hub = Telemetry()
    calls: list[int] = []
    remove = None

    def once(event: Event) -> None:
        calls.append(1)
        assert remove is not None
        remove()

    remove = hub.add_handler(once)
    hub.emit(STARTED)
    hub.emit(STARTED)
    assert calls == [1]


def test_attach_logger(caplog: pytest.LogCaptureFixture) -> None:
    hub = Telemetry()
    stop = hub.attach_logger(level=logging.WARNING, logger_name="tinkex_trio.test")
    with caplog.at_level(logging.WARNING, logger="tinkex_trio.test"):
        hub.emit(RetryScheduled(method="GET", path="/p", attempt=1, delay=0.5, reason="status 503"))
    assert caplog.records[-1].getMessage() == (
        "RetryScheduled method='GET' path='/p' attempt=1 delay=0.5 reason='status 503'"
    )
    stop()
    assert not hub.active


def test_events_round_trip_as_tagged_union() -> None:
    events: list[Event] = [
        STARTED,
        RequestFinished(method="POST", path="/p", status=200, attempt=0, duration=0.1),
        RequestFailed(method="POST", path="/p", error_type="ReadError", attempt=1, duration=0.2),
        RetryScheduled(method="POST", path="/p", attempt=0, delay=1.0, reason="status 429"),
        QueueStateChanged(request_id="r", request_type="Sample", queue_state="paused_capacity"),
        FutureCompleted(request_id="r", request_type="Sample", duration=1.5, ok=True),
        SessionEvent(kind="created", session_id="s"),
    ]
    data = msgspec.json.encode(events)
    assert msgspec.json.decode(data, type=list[Event]) == events
    assert b'"event":"SessionEvent"' in data


def test_events_are_frozen_and_have_no_header_fields() -> None:
    with pytest.raises(AttributeError):
        STARTED.attempt = 2  # type: ignore[misc]
    for cls in (RequestStarted, RequestFinished, RequestFailed, RetryScheduled):
        assert not any("header" in f or "key" in f for f in cls.__struct_fields__)
