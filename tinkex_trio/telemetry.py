"""Typed telemetry events and an in-process hub to observe them.

Synopsis::

    hub = Telemetry()
    remove = hub.add_handler(lambda event: print(event))
    stop_logging = hub.attach_logger()          # one log line per event on "tinkex_trio"
    ...
    remove(); stop_logging()

The transport emits :class:`RequestStarted`, :class:`RequestFinished`, :class:`RequestFailed`
and :class:`RetryScheduled`; the futures and service code emit :class:`QueueStateChanged`,
:class:`FutureCompleted` and :class:`SessionEvent`. Every event is a frozen msgspec Struct tagged
by its class name (the ``event`` field of the encoded form), so ``msgspec.json.encode(event)`` gives a self-describing record.

This hub is local: nothing here sends anything to the server (the server's telemetry endpoint,
PROTOCOL.md 3.1, is fed by the service code if ``Config.telemetry`` is on).

Secrets: no event has a field for headers or credentials; paths are sent without query strings.

Cost: :meth:`Telemetry.emit` with no handlers is a single truthiness test, and callers that build
events may check :attr:`Telemetry.active` first to skip building them at all.

Error handling: a handler that raises is logged (logger ``tinkex_trio.telemetry``, ERROR, with
the traceback) and skipped for that event; the exception never reaches the SDK code that emitted
the event, and the other handlers still run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final, final

import msgspec

__all__ = [
    "Event",
    "FutureCompleted",
    "QueueStateChanged",
    "RequestFailed",
    "RequestFinished",
    "RequestStarted",
    "RetryScheduled",
    "SessionEvent",
    "Telemetry",
    "TelemetryHandler",
]

_logger: Final = logging.getLogger("tinkex_trio.telemetry")


class _EventBase(msgspec.Struct, frozen=True, kw_only=True, tag_field="event", tag=True):
    """Common base: frozen, keyword-only, tagged by class name in the ``event`` field."""


@final
class RequestStarted(_EventBase, frozen=True, kw_only=True):
    """An HTTP attempt is about to be sent. ``attempt`` counts from 0 (layer-A retries)."""

    method: str
    path: str
    attempt: int


@final
class RequestFinished(_EventBase, frozen=True, kw_only=True):
    """An HTTP attempt got a complete response (any status). ``duration`` in seconds."""

    method: str
    path: str
    status: int
    attempt: int
    duration: float


@final
class RequestFailed(_EventBase, frozen=True, kw_only=True):
    """An HTTP attempt got no response; ``error_type`` is the exception's class name."""

    method: str
    path: str
    error_type: str
    attempt: int
    duration: float


@final
class RetryScheduled(_EventBase, frozen=True, kw_only=True):
    """The SDK will retry after ``delay`` seconds. ``reason``: e.g. ``"status 503"``, ``"ReadError"``."""

    method: str
    path: str
    attempt: int
    delay: float
    reason: str


@final
class QueueStateChanged(_EventBase, frozen=True, kw_only=True):
    """A pending future's server-side queue state changed (PROTOCOL.md 4.6)."""

    request_id: str
    request_type: str
    queue_state: str
    reason: str | None = None


@final
class FutureCompleted(_EventBase, frozen=True, kw_only=True):
    """A future resolved: ``ok`` is False if it holds an error. ``duration`` since submission."""

    request_id: str
    request_type: str
    duration: float
    ok: bool


@final
class SessionEvent(_EventBase, frozen=True, kw_only=True):
    """Session lifecycle: ``kind`` such as ``"created"``, ``"heartbeat_failed"``, ``"finished"``."""

    kind: str
    session_id: str


Event = (
    RequestStarted
    | RequestFinished
    | RequestFailed
    | RetryScheduled
    | QueueStateChanged
    | FutureCompleted
    | SessionEvent
)
"""Every event type; decode with ``msgspec.json.decode(data, type=Event)``."""

TelemetryHandler = Callable[[Event], None]
"""A synchronous callback. Keep it quick: it runs inline in the SDK task that emitted the event."""


@final
class Telemetry:
    """A hub that fans events out to handlers. Cheap when nobody listens.

    Handlers are plain functions called inline, in registration order, in the task that emits
    the event; they must not block. To process events asynchronously, send them into a
    ``trio`` memory channel with ``send_nowait`` from the handler.

    Error handling: a raising handler is logged on ``tinkex_trio.telemetry`` at ERROR and skipped;
    the SDK never sees the exception.
    """

    __slots__ = ("_handlers",)

    def __init__(self) -> None:
        self._handlers: tuple[TelemetryHandler, ...] = ()

    @property
    def active(self) -> bool:
        """True if at least one handler is registered (worth building events for)."""
        return bool(self._handlers)

    def add_handler(self, handler: TelemetryHandler) -> Callable[[], None]:
        """Register ``handler``; returns a function that removes it (idempotent)."""
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {handler!r}")
        # Copy-on-write tuple: emit() iterates a snapshot, so a handler may remove itself.
        self._handlers = (*self._handlers, handler)
        removed = False

        def remove() -> None:
            nonlocal removed
            if removed:
                return
            removed = True
            handlers = list(self._handlers)
            for i, h in enumerate(handlers):
                if h is handler:
                    del handlers[i]
                    break
            self._handlers = tuple(handlers)

        return remove

    def emit(self, event: Event) -> None:
        """Deliver ``event`` to every handler; never raises because of a handler."""
        handlers = self._handlers
        if not handlers:
            return
        for handler in handlers:
            try:
                handler(event)
            except Exception:
                _logger.exception(
                    "telemetry handler %r failed on %s", handler, type(event).__name__
                )

    def attach_logger(
        self, level: int = logging.INFO, logger_name: str = "tinkex_trio"
    ) -> Callable[[], None]:
        """Log one line per event (``EventName field=value ...``) on ``logger_name`` at ``level``.

        Returns the remover. For a quick console view also configure logging, e.g.
        ``logging.basicConfig(level=logging.INFO)``.
        """
        logger = logging.getLogger(logger_name)

        def log_event(event: Event) -> None:
            if logger.isEnabledFor(level):
                fields = " ".join(
                    f"{name}={getattr(event, name)!r}" for name in event.__struct_fields__
                )
                logger.log(level, "%s %s", type(event).__name__, fields)

        return self.add_handler(log_event)

    def __repr__(self) -> str:
        return f"<Telemetry handlers={len(self._handlers)}>"
