"""`FuturePoller`: the `retrieve_future` polling of one result (PROTOCOL.md 4.2-4.7).

A long operation is submitted with one POST that answers at once with a request id; the
result is then fetched by polling `POST /api/v1/retrieve_future`, which the server holds open
(long-polls) until the result is ready or a few tens of seconds pass. `FuturePoller.poll` is
that loop; it runs in the service nursery behind an `APIFuture` (`tinkex_trio.futures`), or
in the caller's task for a sample.

What a poll does with each answer. The HTTP errors (PROTOCOL.md 4.3) are the ``poll`` policy
of `tinkex_trio._policy`, applied by the transport, so `poll` only ever sees 2xx answers and
the errors that end it; the 2xx envelope (4.2) is handled here:

============================  ==============================================================
poll outcome                  what happens
============================  ==============================================================
2xx ``try_again``             re-poll at once; a changed queue state is reported
2xx ``complete_metadata``     reserve the announced bytes, re-poll with the payload inlined
2xx ``{"error", ...}``        raise `RequestFailedError` with the category (not retried)
2xx anything else             decode the typed result and return it
408                           transport: re-poll at once; a queue state in the body is reported
5xx                           transport: re-poll at once, back off after three in a row
429 / connection error        transport: sleep ``min(2**n, 30)`` s, n = consecutive such failures
400                           transport: re-poll up to 3 times per future, then raise
402                           transport: the shared billing pause (5 s steps), then raise
410                           raise `GoneError` (sampling retries the whole call)
other 4xx                     raise the status error
============================  ==============================================================

Every poll is one HTTP attempt (no layer A) with a 45 s timeout. The counts behind the
transport's rows (consecutive 5xx, the 400 budget) span the future's polls, as 4.3 has them.
Telemetry: a `QueueStateChanged` event per change and a `FutureCompleted` event at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Final, TypeVar, final

import httpx
import msgspec
import trio

from tinkex_trio import types as t
from tinkex_trio._limits import ByteBudget
from tinkex_trio._policy import POLL, POLL_PROTOBUF
from tinkex_trio._transport import Transport
from tinkex_trio.errors import APIError, RequestFailedError
from tinkex_trio.telemetry import FutureCompleted, QueueStateChanged, Telemetry

_T = TypeVar("_T")

RETRIEVE_FUTURE_PATH: Final = "/api/v1/retrieve_future"
_PROTOBUF: Final = "application/x-protobuf"

ResultDecoder = Callable[[httpx.Response], _T]

RESULT_FIRST_BYTES: Final = 64 * 1024
"""A 2xx poll body at least this large is decoded as the result straight away (one parse,
not an envelope parse and then a result parse): envelopes (try_again, complete_metadata,
error) are a few hundred bytes. If that decode fails, the body is classified as usual."""

_RESULT_FIRST: Final = "_tinkex_result_first"


def result_first(decode: ResultDecoder[_T]) -> ResultDecoder[_T]:
    """Mark `decode` as safe to try before the envelope on a large body: its type has required
    fields no envelope carries (`ForwardBackwardOutput`, `SampleResponse`), so an envelope can
    never decode as its result."""
    setattr(decode, _RESULT_FIRST, True)
    return decode


def json_decoder(type_: type[_T]) -> ResultDecoder[_T]:
    """A result decoder for a JSON result of `type_`."""

    def decode(response: httpx.Response) -> _T:
        return t.decode(response.content, type_)

    return decode


@final
class FuturePoller:
    """What every poll loop of one service shares: transport, telemetry, result byte budget."""

    def __init__(
        self,
        transport: Transport,
        telemetry: Telemetry,
        *,
        response_budget: ByteBudget | None = None,
    ) -> None:
        self.transport = transport
        self.telemetry = telemetry
        self.response_budget = response_budget or ByteBudget(52_428_800)

    async def poll(
        self,
        request_id: str,
        request_type: str,
        decode: ResultDecoder[_T],
        *,
        on_queue_state: Callable[[str, str | None], None] | None = None,
        protobuf: bool = False,
    ) -> _T:
        """Poll `request_id` until it resolves; return the decoded result or raise.

        `protobuf`: the result is asked for as protobuf (PROTOCOL.md 4.5: forward,
        forward_backward and sample results of a protobuf-speaking client).
        """
        started = trio.current_time()
        ok = False
        try:
            # Bytes reserved for a metadata-only result are held until the payload is decoded.
            async with AsyncExitStack() as reservations:
                result = await _Poll(
                    self, request_id, request_type, on_queue_state, protobuf, reservations
                ).run(decode)
            ok = True
            return result
        finally:
            if self.telemetry.active:
                self.telemetry.emit(
                    FutureCompleted(
                        request_id=request_id,
                        request_type=request_type,
                        duration=trio.current_time() - started,
                        ok=ok,
                    )
                )


class _Poll:
    """The polls of one future: its iteration counter, queue state and retry counts."""

    __slots__ = (
        "_on_queue_state",
        "_policy",
        "_poller",
        "_queue_state",
        "_request_id",
        "_request_type",
        "_reservations",
    )

    def __init__(
        self,
        poller: FuturePoller,
        request_id: str,
        request_type: str,
        on_queue_state: Callable[[str, str | None], None] | None,
        protobuf: bool,
        reservations: AsyncExitStack,
    ) -> None:
        self._poller = poller
        self._request_id = request_id
        self._request_type = request_type
        self._on_queue_state = on_queue_state
        self._policy = POLL_PROTOBUF if protobuf else POLL
        self._reservations = reservations
        self._queue_state: str | None = None

    async def run(self, decode: ResultDecoder[_T]) -> _T:
        poller = self._poller
        request_id = self._request_id
        retry_state = self._policy.new_state()
        allow_metadata_only = True
        iteration = 0
        while True:
            body = t.encode(
                t.RetrieveFutureRequest(
                    request_id=request_id, allow_metadata_only=allow_metadata_only
                )
            )
            headers = {
                "X-Tinker-Request-Iteration": str(iteration),
                "X-Tinker-Request-Type": self._request_type,
            }
            iteration += 1
            response = await poller.transport.request(
                "POST",
                RETRIEVE_FUTURE_PATH,
                content=body,
                headers=headers,
                policy=self._policy,
                observe=self._observe,
                state=retry_state,
            )
            if _PROTOBUF in response.headers.get("content-type", ""):
                return _decode(decode, response, request_id)
            if len(response.content) >= RESULT_FIRST_BYTES and getattr(
                decode, _RESULT_FIRST, False
            ):
                try:
                    return decode(response)
                except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
                    pass  # not the result: an envelope after all, classified below
            envelope = _envelope(response, request_id)
            if envelope.type == "try_again":
                self._report(envelope.queue_state, envelope.queue_state_reason)
                continue
            if envelope.status == "complete_metadata":
                if not allow_metadata_only:
                    raise APIError(
                        f"server sent complete_metadata twice for request {request_id}",
                        request=response.request,
                    )
                allow_metadata_only = False
                # Hold the announced bytes until the payload has been fetched and decoded.
                size = max(0, envelope.response_payload_size or 0)
                await self._reservations.enter_async_context(poller.response_budget.reserve(size))
                continue
            if envelope.error is not None:
                raise RequestFailedError(envelope.error, request_id, envelope.category)
            return _decode(decode, response, request_id)

    def _observe(self, response: httpx.Response) -> None:
        """A retried poll answer: a 408 may carry the queue state (PROTOCOL.md 4.3)."""
        if response.status_code != 408:
            return
        try:
            queue = t.decode(response.content, t.QueueStateBody)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if queue.queue_state is not None:
            self._report(queue.queue_state, queue.queue_state_reason)

    def _report(self, state: str | None, reason: str | None) -> None:
        normalized = t.normalize_queue_state(state)
        if normalized == self._queue_state:
            return
        self._queue_state = normalized
        if self._on_queue_state is not None:
            self._on_queue_state(normalized, reason)
        telemetry = self._poller.telemetry
        if telemetry.active:
            telemetry.emit(
                QueueStateChanged(
                    request_id=self._request_id,
                    request_type=self._request_type,
                    queue_state=normalized,
                    reason=reason,
                )
            )


def _envelope(response: httpx.Response, request_id: str) -> t.PollEnvelope:
    try:
        return t.decode(response.content, t.PollEnvelope)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise APIError(
            f"invalid result body for request {request_id}: {exc}", request=response.request
        ) from exc


def _decode(decode: ResultDecoder[_T], response: httpx.Response, request_id: str) -> _T:
    try:
        return decode(response)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise APIError(
            f"invalid result for request {request_id}: {exc}", request=response.request
        ) from exc
