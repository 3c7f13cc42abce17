"""Session-wide completion polling: one long-poll per sampling session (PROTOCOL.md 4.8).

When the server sets `sample_use_retrieve_futures`, a sample does not long-poll its own
result. It waits on a `CompletionWatcher` shared by every sample of its sampling client; the
watcher's single task long-polls `POST /api/v1/retrieve_futures` with a cursor and wakes the
samples whose requests the server reports finished or failed. Each woken sample then fetches
its payload with one `retrieve_future`, which answers at once. Thousands of waiting samples thus
hold one connection and cost one request per poll window between them, instead of one each.

The watcher task runs in the service nursery only while some sample waits, and ends by itself
when none does (a poll in flight when the last waiter leaves is cancelled).

Error handling (4.8): the transport's ``long_poll`` policy (`tinkex_trio._policy`) retries
timeouts, connection errors and 408/409/429/5xx every second and pauses on 402; any other
answer marks the watcher broken and wakes every waiter, which then falls back to polling
`retrieve_future` itself, so a server with a broken `retrieve_futures` degrades to per-sample
polling rather than failing samples. An acknowledgement-only poll is a single attempt: if it
fails, its ids go with the next poll.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

import msgspec
import trio

from tinkex_trio import types as t
from tinkex_trio._policy import ACK_POLL, LONG_POLL
from tinkex_trio.errors import APIError, APIStatusError

if TYPE_CHECKING:
    from tinkex_trio._context import ServiceContext

logger = logging.getLogger("tinkex_trio.sampling")

RETRIEVE_FUTURES_PATH: Final = "/api/v1/retrieve_futures"
# Completions reported before their sample started waiting are kept this long (in entries).
MAX_EARLY_COMPLETIONS: Final = 100_000


class CompletionWatcher:
    """The one `retrieve_futures` poller of a sampling client (clone id 0, PROTOCOL.md 5.3)."""

    def __init__(self, ctx: ServiceContext, sampling_session_id: str) -> None:
        self._ctx = ctx
        self._target = t.RetrieveFuturesTarget(sampling_session_id=sampling_session_id)
        self._waiters: dict[str, trio.Event] = {}
        self._early: dict[str, None] = {}
        self._acknowledge: list[str] = []
        self._cursor = 0
        self._running = False
        self._poll_scope: trio.CancelScope | None = None
        self._flushing = False
        self.broken = False
        self.polls = 0

    async def wait(self, request_id: str) -> None:
        """Return once the server reports `request_id` finished or failed.

        Also returns if the watcher broke (see the module docstring); the caller then polls
        `retrieve_future` as it would without the watcher, so returning early is always safe.
        """
        if request_id in self._early:
            del self._early[request_id]
            await trio.lowlevel.checkpoint()
            return
        if self.broken:
            await trio.lowlevel.checkpoint()
            return
        event = self._waiters.setdefault(request_id, trio.Event())
        if not self._running:
            self._running = True
            self._ctx.nursery.start_soon(self._run)
        try:
            await event.wait()
        finally:
            self._waiters.pop(request_id, None)
            if not self._waiters and self._poll_scope is not None:
                # Nobody waits any more: a long-poll in flight (or its retries against a
                # failing server) has no one to answer. Its acknowledgements go again later.
                self._poll_scope.cancel()

    async def _run(self) -> None:
        try:
            while self._waiters:
                response = None
                with trio.CancelScope() as self._poll_scope:
                    response = await self._poll_once()
                if response is not None:
                    self._deliver(response)
        finally:
            self._poll_scope = None
            self._running = False

    def _deliver(self, response: t.RetrieveFuturesResponse) -> None:
        """Wake the samples whose requests finished; remember the others for later waiters."""
        for completion in response.completions:
            event = self._waiters.pop(completion.request_id, None)
            if event is not None:
                event.set()
            else:
                self._early[completion.request_id] = None
                if len(self._early) > MAX_EARLY_COMPLETIONS:
                    del self._early[next(iter(self._early))]
        self._cursor = max(self._cursor, response.cursor)

    def retrieved(self, request_id: str) -> None:
        """`request_id`'s result (or error) has been fetched: the server may drop its payload.

        Reported on the next poll; if no sample waits (so no poll is coming), one
        acknowledgement-only poll (`timeout: 0`) is sent from the service nursery.
        """
        self._acknowledge.append(request_id)
        if not self._running and not self._flushing and not self.broken:
            self._flushing = True
            self._ctx.nursery.start_soon(self._flush)

    async def _flush(self) -> None:
        try:
            await self._poll_once(ack_only=True)
        finally:
            self._flushing = False

    async def _poll_once(self, *, ack_only: bool = False) -> t.RetrieveFuturesResponse | None:
        sent, self._acknowledge = self._acknowledge, []
        body = t.encode(
            t.RetrieveFuturesRequest(
                target=self._target,
                prev_cursor=self._cursor,
                retrieved_request_ids=sorted(sent),
                timeout=0.0 if ack_only else msgspec.UNSET,
            )
        )
        self.polls += 1
        try:
            response = await self._ctx.transport.request(
                "POST",
                RETRIEVE_FUTURES_PATH,
                content=body,
                policy=ACK_POLL if ack_only else LONG_POLL,
            )
            decoded = t.decode(response.content, t.RetrieveFuturesResponse)
        except BaseException as exc:
            # Not delivered: report these ids again with the next poll.
            self._acknowledge = sent + self._acknowledge
            if not isinstance(exc, APIError | msgspec.DecodeError | msgspec.ValidationError):
                raise
            if ack_only:
                logger.debug("acknowledgement-only retrieve_futures failed: %s", exc)
            elif isinstance(exc, APIStatusError):
                self._break(f"HTTP {exc.status_code}")
            elif isinstance(exc, APIError):
                self._break(f"{type(exc).__name__}: {exc}")
            else:
                self._break(f"invalid body: {exc}")
            return None
        if ack_only:
            # Completions in this answer are remembered like any others.
            self._deliver(decoded)
            return None
        return decoded

    def _break(self, why: str) -> None:
        logger.warning(
            "retrieve_futures failed (%s) for %s; samples poll their results one by one",
            why,
            self._target.sampling_session_id,
        )
        self.broken = True
        for event in self._waiters.values():
            event.set()
        self._waiters.clear()
