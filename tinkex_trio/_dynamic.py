"""Dynamic config and server-side cancellation of abandoned samples (PROTOCOL.md 2.1, 4.9).

`open_service` fetches `POST /api/v1/client/dynamic_config` once at start and keeps it fresh
with `DynamicConfig.refresh_forever`, a task of the service nursery. One of its flags,
`sample_cancel_enabled`, turns on `SampleCanceller`: a `sample()` or `compute_logprobs()` call
that is abandoned (its caller's cancel scope, its `timeout=`, or the service closing) after its
submit succeeded and before its result arrived queues its request id, and the canceller's task
sends `POST /api/v1/cancel_future` for it, so that "nothing is left running" also holds on the
server: a sample still queued there never reaches the engine.

Why a queue and a task rather than a cancel call in the abandoned sample: a cancelled trio task
must not wait on the network (the caller asked to stop, and a shielded request would make every
`move_on_after` around a sample last a round trip longer). Queuing is a dict insert.

Why start-up tolerates any failure (PROTOCOL.md 2.1 says only 404): the flags only enable an
optimisation, so a server that fails the call should not fail the session or delay it; the
start-up fetch is one attempt with the refresh timeout. A 404 means the server has no dynamic
config at all, so nothing is refreshed then either.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

import trio

from tinkex_trio import types as t
from tinkex_trio._optional_endpoints import is_missing_endpoint, note_missing_endpoint
from tinkex_trio._policy import CANCEL, DYNAMIC_CONFIG, DYNAMIC_CONFIG_TIMEOUT
from tinkex_trio._version import __version__
from tinkex_trio.errors import APIError, APIStatusError

if TYPE_CHECKING:
    from tinkex_trio._transport import Transport

logger = logging.getLogger("tinkex_trio.service")

DYNAMIC_CONFIG_PATH: Final = "/api/v1/client/dynamic_config"
CANCEL_FUTURE_PATH: Final = "/api/v1/cancel_future"
# PROTOCOL.md 2.1: refreshed every max(refresh_interval_sec, 10) s.
MIN_REFRESH_INTERVAL: Final = 10.0
# How long `open_service` waits at exit for the last cancels before finishing the session. Not
# in PROTOCOL.md: a cancel only saves server work, so closing must not wait on it for long.
CANCEL_FLUSH_TIMEOUT: Final = 2.0


async def fetch_dynamic_config(transport: Transport) -> t.DynamicConfigResponse | None:
    """One `client/dynamic_config` attempt: the flags, or None for a 404 or 405 (no such
    endpoint; noted once per process by `_optional_endpoints`).

    Raises `APIError` (any other failure) and `msgspec` decode errors for a bad body.
    """
    body = t.encode(t.DynamicConfigRequest(sdk_version=__version__))
    try:
        response = await transport.request(
            "POST", DYNAMIC_CONFIG_PATH, content=body, policy=DYNAMIC_CONFIG
        )
    except APIStatusError as exc:
        if not is_missing_endpoint(exc):
            raise
        note_missing_endpoint("client/dynamic_config", exc.status_code)
        return None
    return t.decode(response.content, t.DynamicConfigResponse)


class DynamicConfig:
    """The service's current dynamic flags (`value`), and whether the server has any."""

    def __init__(self) -> None:
        self.value = t.DynamicConfigResponse()
        self.supported = True
        self.refreshes = 0

    async def load(self, transport: Transport) -> None:
        """The start-up fetch: one attempt; on any failure the defaults stay (logged at debug)."""
        with trio.move_on_after(DYNAMIC_CONFIG_TIMEOUT):
            try:
                fetched = await fetch_dynamic_config(transport)
            except Exception as exc:  # APIError or an undecodable body
                logger.debug("client/dynamic_config failed at start-up (%s); defaults used", exc)
                return
            if fetched is None:
                self.supported = False
                return
            self.value = fetched
            return
        logger.debug("client/dynamic_config timed out at start-up; defaults used")

    async def refresh_forever(
        self,
        transport: Transport,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Refresh every `max(refresh_interval_sec, 10)` s until cancelled (PROTOCOL.md 2.1).

        Error handling: each refresh is a single attempt with a 10 s timeout; a failure (any
        `APIError`, a bad body, a 404) keeps the last good values and is logged at debug on
        `tinkex_trio.service`. Not started at all if the start-up fetch got a 404.
        """
        task_status.started()
        while True:
            await trio.sleep(max(self.value.refresh_interval_sec, MIN_REFRESH_INTERVAL))
            self.refreshes += 1
            with trio.move_on_after(DYNAMIC_CONFIG_TIMEOUT):
                try:
                    fetched = await fetch_dynamic_config(transport)
                except Exception as exc:
                    logger.debug("client/dynamic_config refresh failed: %s", exc)
                    continue
                if fetched is not None:
                    self.value = fetched


class SampleCanceller:
    """Sends `cancel_future` for abandoned samples from one task of the service nursery.

    `abandon(request_id)` never blocks; `run` drains the queue in batches of up to
    `sample_cancel_max_batch_size` ids, one request per id, each batch in parallel
    (PROTOCOL.md 4.9); `flush` sends what is left at service exit.

    Error handling: each `cancel_future` is sent under the transport's ``cancel`` policy (layer
    B without layer A, 9.3; a 30 s read timeout, 1.5); a final failure is logged at INFO on
    `tinkex_trio.service` and dropped (the server also stops abandoned work when the session's
    heartbeats lapse).
    """

    def __init__(self, transport: Transport, config: DynamicConfig) -> None:
        self._transport = transport
        self._config = config
        # Insertion-ordered set of request ids waiting to be sent.
        self._pending: dict[str, None] = {}
        # Ids of the batch `run` is sending now; `flush` sends them again if the service
        # closes first (a second cancel of the same id is a no-op on the server).
        self._in_flight: set[str] = set()
        self._wake = trio.Event()
        self.sent = 0
        self.failed = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def abandon(self, request_id: str) -> None:
        """Queue `request_id` for `cancel_future` if the server enabled it; never waits."""
        if not self._config.value.sample_cancel_enabled:
            return
        self._pending[request_id] = None
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send queued cancels until cancelled, one batch at a time."""
        task_status.started()
        while True:
            if not self._pending:
                self._wake = trio.Event()
                await self._wake.wait()
            batch = self._take()
            self._in_flight.update(batch)
            try:
                await self._send_batch(batch)
            finally:
                self._in_flight.difference_update(batch)

    async def flush(self) -> None:
        """Send everything queued or still in flight in `run` (the caller sets a deadline).

        Called by `open_service` after it cancelled `run`: the snapshot of the in-flight batch
        is taken before `run` unwinds, so a cancel interrupted there is sent again here.
        """
        for request_id in self._in_flight:
            self._pending[request_id] = None
        self._in_flight.clear()
        while self._pending:
            await self._send_batch(self._take())

    def _take(self) -> list[str]:
        size = max(1, self._config.value.sample_cancel_max_batch_size)
        batch = list(self._pending)[:size]
        for request_id in batch:
            del self._pending[request_id]
        return batch

    async def _send_batch(self, batch: list[str]) -> None:
        async with trio.open_nursery() as nursery:
            for request_id in batch:
                nursery.start_soon(self._cancel_one, request_id)

    async def _cancel_one(self, request_id: str) -> None:
        body = t.encode(t.CancelFutureRequest(request_id=request_id))
        try:
            await self._transport.request("POST", CANCEL_FUTURE_PATH, content=body, policy=CANCEL)
        except APIError as exc:
            self.failed += 1
            logger.info("cancel_future for %s failed: %s", request_id, exc)
        else:
            self.sent += 1
