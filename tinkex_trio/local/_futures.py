"""Futures: the rows in the store plus in-memory wake-ups for long-polling pollers.

A future is created pending when a long operation is submitted, and finished exactly once
(done with a result payload, or failed with a message and a category). `wait_finished` is the
long-poll: it returns as soon as the future finishes, or after the poll window with the row
still pending, and the caller then answers `try_again` (PROTOCOL.md 4.2, A.3.7).

Result payloads are stored as JSON bytes. `render_result` is the one place that turns a stored
future into a poll response: pollers that send `Accept: application/x-protobuf` get
forward/forward_backward and sample results as protobuf (PROTOCOL.md 4.5), everyone else JSON.

Sampling futures also feed a `CompletionLog` per (sampling session, clone id): the event list
that `retrieve_futures` long-polls with a cursor (PROTOCOL.md 4.8).

Retrieved payloads (4.8 `retrieved_request_ids`): a sample's result is deleted once the client
has listed it as retrieved *and* the server has delivered the full payload at least once, in
either order. The protocol says the list holds fully fetched requests, but a client may list a
request as soon as it is reported complete (this SDK's `CompletionWatcher` does: the next
`retrieve_futures` poll can overtake the woken sample's `retrieve_future`); deleting on the
acknowledgement alone would then answer that fetch 410 and force a resubmission. A poll after
the deletion answers 410 (4.3: the promise is gone).
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Final

import trio

from tinkex_trio import _protobuf, types as t

from ._store import Category, FutureRow, Store

logger = logging.getLogger("tinkex_trio.local.futures")

JSON_CONTENT_TYPE = "application/json"
#: Result types served as protobuf to a poller that asks for it (PROTOCOL.md 4.5, 9.12).
PROTOBUF_RESULT_TYPES: Final = frozenset({"Forward", "ForwardBackward", "Sample"})
#: PROTOCOL.md 5.3: a clone's seq_ids start at clone_id * 1e9, so seq_id // 1e9 is its id.
CLONE_SEQ_STRIDE: Final = 1_000_000_000
#: Completion events kept per sampling session beyond the newest acknowledged cursor.
MAX_LOG_EVENTS: Final = 100_000
#: Sample futures remembered as "acknowledged, not yet delivered" and as "delivered, not yet
#: acknowledged" (each; oldest forgotten first). Clients that never acknowledge (no
#: retrieve_futures, PROTOCOL.md 4.8) would otherwise grow the second set forever; a forgotten
#: entry only means that payload is kept, as it would be without retrieved_request_ids.
MAX_TRACKED_RETRIEVALS: Final = 100_000


@dataclass
class CompletionEvent:
    cursor: int
    request_id: str
    state: str  # "finished" | "failed"
    size: int


@dataclass
class CompletionLog:
    """Finished sampling requests of one (sampling session, clone), in completion order.

    Cursors count from 1; a poller that acknowledged cursor c has seen every event <= c, so
    those may be trimmed (PROTOCOL.md 4.8).
    """

    events: list[CompletionEvent] = field(default_factory=list)
    next_cursor: int = 1
    changed: trio.Event = field(default_factory=trio.Event)

    def append(self, request_id: str, state: str, size: int) -> None:
        self.events.append(CompletionEvent(self.next_cursor, request_id, state, size))
        self.next_cursor += 1
        if len(self.events) > MAX_LOG_EVENTS:
            del self.events[: len(self.events) - MAX_LOG_EVENTS]
        self.changed.set()
        self.changed = trio.Event()

    def after(self, cursor: int) -> list[CompletionEvent]:
        # Everything at or before an acknowledged cursor is seen: trim it.
        while self.events and self.events[0].cursor <= cursor:
            self.events.pop(0)
        return [e for e in self.events if e.cursor > cursor]


def new_request_id() -> str:
    return "req-" + secrets.token_hex(12)


class FutureRegistry:
    """Creates, finishes and waits on futures. Use from the trio thread only."""

    def __init__(self, store: Store) -> None:
        self._store = store
        # One Event per future that some poller may still wait on; set and dropped on finish.
        self._events: dict[str, trio.Event] = {}
        self._logs: dict[tuple[str, int], CompletionLog] = {}
        # Insertion-ordered sets (dicts) of sample request ids; see the module docstring.
        self._acknowledged: dict[str, None] = {}
        self._delivered: dict[str, None] = {}
        # Futures that were answered metadata-only once (PROTOCOL.md 4.4: never twice).
        self._metadata_announced: dict[str, None] = {}

    def completion_log(self, sampling_session_id: str, clone_id: int) -> CompletionLog:
        key = (sampling_session_id, clone_id)
        log = self._logs.get(key)
        if log is None:
            log = self._logs[key] = CompletionLog()
        return log

    def forget_sampling_session(self, sampling_session_id: str) -> None:
        """Drop the completion logs of a sampling session whose session finished."""
        for key in [k for k in self._logs if k[0] == sampling_session_id]:
            del self._logs[key]

    def _log_completion(self, request_id: str, state: str, size: int) -> None:
        row = self._store.get_future(request_id)
        if row is None or row.sampling_session_id is None or row.seq_id is None:
            return
        clone = row.seq_id // CLONE_SEQ_STRIDE
        self.completion_log(row.sampling_session_id, clone).append(request_id, state, size)

    def acknowledge_retrieved(self, sampling_session_id: str, request_ids: list[str]) -> int:
        """`retrieved_request_ids` of a `retrieve_futures` poll (PROTOCOL.md 4.8).

        Only finished sample futures of `sampling_session_id` count (a client cannot delete
        another session's results); unknown or pending ids are ignored. Each payload already
        delivered is deleted now, the others when they are delivered. Returns the number of
        payloads deleted.
        """
        dropped = 0
        for request_id in request_ids:
            row = self._store.get_future(request_id)
            if (
                row is None
                or row.sampling_session_id != sampling_session_id
                or row.state != "done"
                or row.result is None
            ):
                continue
            if request_id in self._delivered:
                del self._delivered[request_id]
                self._store.drop_result(request_id)
                dropped += 1
            else:
                _remember(self._acknowledged, request_id)
        return dropped

    def delivered(self, row: FutureRow) -> None:
        """A poll was answered with the full result of `row` (not metadata-only, 4.4)."""
        if row.state != "done" or row.sampling_session_id is None or row.result is None:
            return
        if row.request_id in self._acknowledged:
            del self._acknowledged[row.request_id]
            self._store.drop_result(row.request_id)
        else:
            _remember(self._delivered, row.request_id)

    def announce_metadata_only(self, request_id: str) -> bool:
        """True the first time only: whether this poll may answer `complete_metadata` (4.4).

        The client asserts that a future is announced at most once; remembering it here (not
        trusting the next poll's `allow_metadata_only: false`) also covers a second client
        polling the same future, or a first answer lost on the way.
        """
        if request_id in self._metadata_announced:
            return False
        _remember(self._metadata_announced, request_id)
        return True

    def cancel(self, request_id: str) -> bool:
        """Fail a pending future as cancelled (PROTOCOL.md 4.9); False if unknown or finished.

        The engine may still finish the work; its result is then dropped (`complete` and
        `fail` leave finished futures alone).
        """
        row = self._store.get_future(request_id)
        if row is None or row.state in ("done", "failed"):
            return False
        self.fail(request_id, "cancelled by the client (cancel_future)", "user")
        return True

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

    def _finished(self, request_id: str) -> bool:
        row = self._store.get_future(request_id)
        return row is not None and row.state in ("done", "failed")

    def complete(self, request_id: str, result: bytes) -> None:
        if self._finished(request_id):  # cancelled meanwhile: keep the first outcome
            return
        self._store.complete_future(request_id, result, trio_now_wall())
        self._wake(request_id)
        self._log_completion(request_id, "finished", len(result))

    def fail(self, request_id: str, message: str, category: Category) -> None:
        if self._finished(request_id):
            return
        self._store.fail_future(request_id, message, category, trio_now_wall())
        self._wake(request_id)
        self._log_completion(request_id, "failed", 0)

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


def _remember(ids: dict[str, None], request_id: str) -> None:
    ids[request_id] = None
    if len(ids) > MAX_TRACKED_RETRIEVALS:
        del ids[next(iter(ids))]


def trio_now_wall() -> float:
    """Wall-clock seconds for timestamps stored in the database."""
    return time.time()


@dataclass(frozen=True)
class RenderedResult:
    status: int
    content_type: str
    body: bytes


def render_result(row: FutureRow, *, accept: str | None = None) -> RenderedResult:
    """Turn a future row into the `retrieve_future` answer (PROTOCOL.md 4.2, A.3.2-A.3.5).

    `accept` is the poll's Accept header: a forward/forward_backward or sample result goes as
    protobuf when it names `application/x-protobuf` (4.5); everything else, including
    try_again and error bodies of those requests, is JSON (A.2.4: JSON unless asked).
    """
    if row.state == "done":
        if (
            accept is not None
            and _protobuf.PROTOBUF_CONTENT_TYPE in accept
            and row.request_type in PROTOBUF_RESULT_TYPES
            and row.result is not None
        ):
            return RenderedResult(
                200, _protobuf.PROTOBUF_CONTENT_TYPE, _as_protobuf(row.request_type, row.result)
            )
        return RenderedResult(200, JSON_CONTENT_TYPE, row.result or b"{}")
    if row.state == "failed":
        failure = t.RequestFailedResponse(
            error=row.error or "request failed", category=t.normalize_category(row.category)
        )
        return RenderedResult(200, JSON_CONTENT_TYPE, t.encode(failure))
    pending = t.TryAgainResponse(request_id=row.request_id, queue_state="active")
    return RenderedResult(200, JSON_CONTENT_TYPE, t.encode(pending))


def _as_protobuf(request_type: str, stored: bytes) -> bytes:
    """The stored JSON result re-encoded as the protobuf message of PROTOCOL.md 6.4 / 6.5."""
    if request_type == "Sample":
        return _protobuf.encode_sample_response(t.decode(stored, t.SampleResponse))
    return _protobuf.encode_forward_backward_output(t.decode(stored, t.ForwardBackwardOutput))
