"""Session-wide completion polling: one long-poll per sampling session (PROTOCOL.md 4.8).

When the server sets `sample_use_retrieve_futures`, a sample does not long-poll its own
result. It waits on a `CompletionWatcher` shared by every sample of its sampling client; the
watcher's single task long-polls `POST /api/v1/retrieve_futures` with a cursor and wakes the
samples whose requests the server reports finished or failed. Each woken sample then fetches
its payload with one `retrieve_future`, which answers at once. Thousands of waiting samples thus
hold one connection and cost one request per poll window between them, instead of one each.

The watcher task runs in the service nursery only while some sample waits, and ends by itself
when none does.

Error handling (4.8): timeouts, connection errors and 408/409/429/5xx are retried after
`RETRY_DELAY` s (a 402 after the billing delay); any other answer marks the watcher broken and
wakes every waiter, which then falls back to polling `retrieve_future` itself, so a server
with a broken `retrieve_futures` degrades to per-sample polling rather than failing samples.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

import msgspec
import trio

from tinkex_trio import types as t
from tinkex_trio.errors import APIConnectionError, APIStatusError, BillingError

if TYPE_CHECKING:
    from tinkex_trio._context import ServiceContext

logger = logging.getLogger("tinkex_trio.sampling")

RETRIEVE_FUTURES_PATH: Final = "/api/v1/retrieve_futures"
# PROTOCOL.md 1.5: retrieve_futures polls time out after 45 s; the server long-polls ~30 s.
RETRIEVE_FUTURES_TIMEOUT: Final = 45.0
# PROTOCOL.md 1.5: an acknowledgement-only poll (timeout 0) times out after 5 s.
ACK_ONLY_TIMEOUT: Final = 5.0
# PROTOCOL.md 4.8: retryable poll errors are retried after 1 s.
RETRY_DELAY: Final = 1.0
BILLING_RETRY_DELAY: Final = 5.0
# Completions reported before their sample started waiting are kept this long (in entries).
MAX_EARLY_COMPLETIONS: Final = 100_000
_RETRYABLE: Final = frozenset({408, 409, 429})


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

    async def _run(self) -> None:
        try:
            while self._waiters:
                response = await self._poll_once()
                if response is not None:
                    self._deliver(response)
        finally:
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
            try:
                response = await self._ctx.transport.request(
                    "POST",
                    RETRIEVE_FUTURES_PATH,
                    content=body,
                    timeout=ACK_ONLY_TIMEOUT if ack_only else RETRIEVE_FUTURES_TIMEOUT,
                    max_retries=0,
                )
                decoded = t.decode(response.content, t.RetrieveFuturesResponse)
            except BaseException:
                # Not delivered: report these ids again with the next poll.
                self._acknowledge = sent + self._acknowledge
                raise
        except APIConnectionError:
            await trio.sleep(RETRY_DELAY)
            return None
        except BillingError:
            await trio.sleep(BILLING_RETRY_DELAY)
            return None
        except APIStatusError as exc:
            if exc.status_code in _RETRYABLE or exc.status_code >= 500:
                await trio.sleep(RETRY_DELAY)
                return None
            self._break(f"HTTP {exc.status_code}")
            return None
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
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
