"""Telemetry for the server (PROTOCOL.md 3.1 `POST /api/v1/telemetry`), when `Config.telemetry` is on.

What is reported is what the official SDK reports, and no more:

* `SESSION_START` when the session opens;
* when the service block ends with an exception: `UNHANDLED_EXCEPTION` (the exception's type,
  message and traceback; severity WARNING for a `RequestFailedError` of category `user`, else
  ERROR) and `SESSION_END` with the session's duration (Python's `timedelta` text, 3.1);
* `GENERIC_EVENT` `session_heartbeat_failing` when heartbeats have failed for two minutes.

The in-process hub (`telemetry.py`) is not forwarded: it is for the user's own observers and
carries per-request detail the server has no use for. No event has a field for headers or
credentials. `TINKER_TELEMETRY=0` or `Config(telemetry=False)` turns all of this off.

Delivery: batches of at most `MAX_BATCH` events, every `FLUSH_INTERVAL` s, from one task in the
service nursery; a final flush when the block ends (bounded by `FINAL_FLUSH_TIMEOUT`), which is
when the failure events are sent. The queue holds at most `MAX_QUEUED` events (later ones are dropped
and counted). A batch that fails is dropped, as the official SDK does: telemetry never retries
forever or fails the user's work; the first failure is logged at DEBUG (a server without the
endpoint answers 404 on every batch, which is not worth a warning).
"""

from __future__ import annotations

import datetime
import logging
import platform
import traceback
import uuid
from collections import deque
from typing import Any, Final

import trio

from tinkex_trio import types as t
from tinkex_trio._policy import TELEMETRY
from tinkex_trio._transport import Transport
from tinkex_trio._version import __version__
from tinkex_trio.errors import APIError, RequestFailedError

logger = logging.getLogger("tinkex_trio.telemetry")

FLUSH_INTERVAL: Final = 10.0
MAX_BATCH: Final = 100
MAX_QUEUED: Final = 10_000
FINAL_FLUSH_TIMEOUT: Final = 5.0
TELEMETRY_PATH: Final = "/api/v1/telemetry"

# One id per process, so the server can tell processes sharing a session apart (3.1).
_PROCESS_UUID: Final = str(uuid.uuid4())


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


class ServerTelemetry:
    """The events one session reports to the server, and the task that sends them."""

    def __init__(self, transport: Transport, session_id: str) -> None:
        self._transport = transport
        self._session_id = session_id
        self._queue: deque[t.TelemetryEvent] = deque()
        self._index = 0
        self._started_at = trio.current_time()
        self._failure_logged = False
        self.dropped = 0
        """Events not queued because `MAX_QUEUED` were waiting."""

    # -- events -----------------------------------------------------------------------------

    def session_start(self) -> None:
        self._record("SESSION_START", "INFO")

    def heartbeat_failing(self, seconds: float) -> None:
        self._record(
            "GENERIC_EVENT",
            "WARNING",
            event_name="session_heartbeat_failing",
            event_data={"seconds_without_heartbeat": round(seconds, 1)},
        )

    def session_failed(self, exc: BaseException) -> None:
        """`UNHANDLED_EXCEPTION` then `SESSION_END`, for the exception that ended the block."""
        user = isinstance(exc, RequestFailedError) and exc.category == "user"
        self._record(
            "UNHANDLED_EXCEPTION",
            "WARNING" if user else "ERROR",
            error_type=type(exc).__name__,
            error_message=str(exc),
            traceback="".join(traceback.format_exception(exc)),
        )
        elapsed = datetime.timedelta(seconds=trio.current_time() - self._started_at)
        self._record("SESSION_END", "INFO", duration=str(elapsed))

    def _record(self, kind: str, severity: str, **fields: Any) -> None:
        if len(self._queue) >= MAX_QUEUED:
            self.dropped += 1
            return
        self._queue.append(
            t.TelemetryEvent(
                event=kind,
                event_id=str(uuid.uuid4()),
                event_session_index=self._index,
                severity=severity,
                timestamp=_now(),
                **fields,
            )
        )
        self._index += 1

    # -- delivery ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send what is queued every `FLUSH_INTERVAL` s, until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(FLUSH_INTERVAL)
            await self.flush()

    async def flush(self) -> None:
        """Send every queued event, `MAX_BATCH` at a time; a failed batch is dropped."""
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
            body = t.encode(
                t.TelemetryBatch(
                    events=batch,
                    platform=platform.system(),
                    sdk_version=__version__,
                    session_id=self._session_id,
                    process_uuid=_PROCESS_UUID,
                )
            )
            try:
                await self._transport.request(
                    "POST", TELEMETRY_PATH, content=body, policy=TELEMETRY
                )
            except APIError as exc:
                if not self._failure_logged:
                    self._failure_logged = True
                    logger.debug("telemetry batch dropped (%s); later failures are not logged", exc)
