"""Futures: the rows in the store plus in-memory wake-ups for long-polling pollers.

A future is created pending when a long operation is submitted, and finished exactly once
(done with a result payload, or failed with a message and a category). `wait_finished` is the
long-poll: it returns as soon as the future finishes, or after the poll window with the row
still pending, and the caller then answers `try_again` (PROTOCOL.md 4.2, A.3.7).

Result payloads are stored as JSON bytes. `render_result` is the one place that turns a stored
future into a poll response, so serving protobuf to pollers that send
`Accept: application/x-protobuf` (PROTOCOL.md 4.5) is a change to that function only.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass

import msgspec
import trio

from ._store import Category, FutureRow, Store

logger = logging.getLogger("tinkex_trio.local.futures")

#: How long a `retrieve_future` poll is held before answering `try_again`. PROTOCOL.md A.3.7
#: recommends well under the client's 45 s poll timeout (≤ 30 s); 20 s leaves room for slow
#: networks while keeping the number of polls (and client WARNING lines) low.
DEFAULT_POLL_TIMEOUT = 20.0

JSON_CONTENT_TYPE = "application/json"


def new_request_id() -> str:
    return "req-" + secrets.token_hex(12)


class FutureRegistry:
    """Creates, finishes and waits on futures. Use from the trio thread only."""

    def __init__(self, store: Store) -> None:
        self._store = store
        # One Event per future that some poller may still wait on; set and dropped on finish.
        self._events: dict[str, trio.Event] = {}

    def create(
        self,
        *,
        request_type: str,
        payload_hash: str,
        model_id: str | None = None,
        sampling_session_id: str | None = None,
        seq_id: int | None = None,
    ) -> str:
        """Insert a pending future and return its request id.

        Raises sqlite3.IntegrityError if (model_id, seq_id) or (sampling_session_id, seq_id)
        already exists; callers check for duplicates first (`Store.find_future_by_seq`).
        """
        request_id = new_request_id()
        self._store.insert_future(
            request_id=request_id,
            model_id=model_id,
            sampling_session_id=sampling_session_id,
            seq_id=seq_id,
            request_type=request_type,
            payload_hash=payload_hash,
            now=trio_now_wall(),
        )
        self._events[request_id] = trio.Event()
        return request_id

    def mark_running(self, request_id: str) -> None:
        self._store.mark_running(request_id)

    def complete(self, request_id: str, result: bytes) -> None:
        self._store.complete_future(request_id, result, trio_now_wall())
        self._wake(request_id)

    def fail(self, request_id: str, message: str, category: Category) -> None:
        self._store.fail_future(request_id, message, category, trio_now_wall())
        self._wake(request_id)

    def _wake(self, request_id: str) -> None:
        event = self._events.pop(request_id, None)
        if event is not None:
            event.set()

    async def wait_finished(self, request_id: str, window: float) -> FutureRow | None:
        """Long-poll: the row once finished, or the pending row after `window` seconds.

        Returns None for an unknown request id. Always checkpoints.
        """
        row = self._store.get_future(request_id)
        if row is None or row.state in ("done", "failed"):
            await trio.lowlevel.checkpoint()
            return row
        event = self._events.get(request_id)
        if event is None:
            # Pending in the database but unknown in memory cannot happen after `Store.open`
            # recovery; answer the row as it is rather than wait on nothing.
            await trio.lowlevel.checkpoint()
            return row
        with trio.move_on_after(window):
            await event.wait()
        return self._store.get_future(request_id)


def trio_now_wall() -> float:
    """Wall-clock seconds for timestamps stored in the database."""
    return time.time()


@dataclass(frozen=True)
class RenderedResult:
    status: int
    content_type: str
    body: bytes


class _TryAgain(msgspec.Struct):
    type: str
    request_id: str
    queue_state: str


class _Failure(msgspec.Struct):
    error: str
    category: str


def render_result(row: FutureRow, *, accept: str | None = None) -> RenderedResult:
    """Turn a future row into the `retrieve_future` answer (PROTOCOL.md 4.2, A.3.2-A.3.5).

    `accept` is the poll's Accept header; today every answer is JSON (A.2.4: JSON is what a
    client gets unless it asks for protobuf, and protobuf is not implemented yet).
    """
    del accept  # protobuf results (PROTOCOL.md 4.5) will branch here.
    if row.state == "done":
        return RenderedResult(200, JSON_CONTENT_TYPE, row.result or b"{}")
    if row.state == "failed":
        category = row.category if row.category in ("user", "server", "unknown") else "unknown"
        body = msgspec.json.encode(_Failure(error=row.error or "request failed", category=category))
        return RenderedResult(200, JSON_CONTENT_TYPE, body)
    body = msgspec.json.encode(
        _TryAgain(type="try_again", request_id=row.request_id, queue_state="active")
    )
    return RenderedResult(200, JSON_CONTENT_TYPE, body)
