"""`APIFuture` and the `retrieve_future` polling loop (PROTOCOL.md 4.2-4.7).

A long operation is submitted with one POST that answers at once with a request id; the
result is then fetched by polling `POST /api/v1/retrieve_future`, which the server holds open
(long-polls) until the result is ready or a few tens of seconds pass. `poll_result` is that
loop; `APIFuture` is the handle a caller awaits while the loop runs in the service nursery.

Error handling (the rules of PROTOCOL.md 4.3, as a table):

============================  ==============================================================
poll outcome                  what `poll_result` does
============================  ==============================================================
2xx ``try_again``             re-poll at once; a changed queue state is reported
2xx ``complete_metadata``     reserve the announced bytes, re-poll with the payload inlined
2xx ``{"error", ...}``        raise `RequestFailedError` with the category (not retried)
2xx anything else             decode the typed result and return it
408                           re-poll at once; a queue state in the body is reported
5xx                           re-poll at once, then back off after `IMMEDIATE_5XX_REPOLLS`
429 / connection error        sleep ``min(2**n, 30)`` s, n = consecutive such failures
400                           re-poll up to `MAX_BAD_REQUEST_POLLS` times, then raise
402                           billing pause: sleep 5 s and re-poll until the pause window ends
410                           raise `GoneError` (sampling retries the whole call)
other 4xx                     raise the status error
============================  ==============================================================

Every poll is one HTTP attempt (layer-A retries off) with a 45 s timeout. Telemetry: a
`QueueStateChanged` event per change and a `FutureCompleted` event at the end.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Generator
from contextlib import AsyncExitStack
from typing import Any, Final, Generic, TypeVar, final

import httpx
import msgspec
import trio

from tinkex_trio import types as t
from tinkex_trio._limits import ByteBudget
from tinkex_trio._transport import Transport
from tinkex_trio.errors import (
    APIConnectionError,
    APIError,
    BillingError,
    ClientClosedError,
    RequestFailedError,
    ResultTimeoutError,
    TinkexError,
    status_error_for,
)
from tinkex_trio.telemetry import FutureCompleted, QueueStateChanged, Telemetry

T = TypeVar("T")

RETRIEVE_FUTURE_PATH: Final = "/api/v1/retrieve_future"
# PROTOCOL.md 1.5: result polls time out after 45 s; the server long-polls for less.
RETRIEVE_FUTURE_TIMEOUT: Final = 45.0
# PROTOCOL.md 4.3: a bare 400 on a poll is re-polled at most 3 times.
MAX_BAD_REQUEST_POLLS: Final = 3
# PROTOCOL.md 4.3: 429 and connection errors back off min(2**n, 30) s.
BACKOFF_CAP: Final = 30.0
# PROTOCOL.md 4.3 re-polls 5xx at once, forever. A server that fails every poll instantly
# would make that a hot loop, so after this many consecutive 5xx we back off like a 429.
IMMEDIATE_5XX_REPOLLS: Final = 3
# PROTOCOL.md 9.6: 402 means "billing paused": wait 5 s and retry, for up to an hour.
BILLING_RETRY_DELAY: Final = 5.0
DEFAULT_BILLING_PAUSE_MAX: Final = 3600.0

ResultDecoder = Callable[[httpx.Response], T]


def json_decoder(type_: type[T]) -> ResultDecoder[T]:
    """A result decoder for a JSON result of `type_`."""

    def decode(response: httpx.Response) -> T:
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
        billing_pause_max: float = DEFAULT_BILLING_PAUSE_MAX,
    ) -> None:
        self.transport = transport
        self.telemetry = telemetry
        self.response_budget = response_budget or ByteBudget(52_428_800)
        self.billing_pause_max = billing_pause_max

    async def poll(
        self,
        request_id: str,
        request_type: str,
        decode: ResultDecoder[T],
        *,
        on_queue_state: Callable[[str, str | None], None] | None = None,
        accept: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> T:
        """Poll `request_id` until it resolves; return the decoded result or raise."""
        started = trio.current_time()
        ok = False
        try:
            # Bytes reserved for a metadata-only result are held until the payload is decoded.
            async with AsyncExitStack() as reservations:
                result = await self._poll_loop(
                    request_id,
                    request_type,
                    decode,
                    on_queue_state,
                    accept,
                    headers or {},
                    reservations,
                )
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

    async def _poll_loop(
        self,
        request_id: str,
        request_type: str,
        decode: ResultDecoder[T],
        on_queue_state: Callable[[str, str | None], None] | None,
        accept: str,
        extra_headers: dict[str, str],
        reservations: AsyncExitStack,
    ) -> T:
        allow_metadata_only = True
        iteration = 0
        backoff_exponent = 0  # consecutive 429s / connection errors
        consecutive_5xx = 0
        bad_requests = 0
        billing_since: float | None = None
        queue_state: str | None = None

        def report(state: str | None, reason: str | None) -> None:
            nonlocal queue_state
            normalized = t.normalize_queue_state(state)
            if normalized == queue_state:
                return
            queue_state = normalized
            if on_queue_state is not None:
                on_queue_state(normalized, reason)
            if self.telemetry.active:
                self.telemetry.emit(
                    QueueStateChanged(
                        request_id=request_id,
                        request_type=request_type,
                        queue_state=normalized,
                        reason=reason,
                    )
                )

        while True:
            body = t.encode(
                t.RetrieveFutureRequest(
                    request_id=request_id, allow_metadata_only=allow_metadata_only
                )
            )
            headers = {
                "X-Tinker-Request-Iteration": str(iteration),
                "X-Tinker-Request-Type": request_type,
                **extra_headers,
            }
            iteration += 1
            try:
                response = await self.transport.request(
                    "POST",
                    RETRIEVE_FUTURE_PATH,
                    content=body,
                    headers=headers,
                    timeout=RETRIEVE_FUTURE_TIMEOUT,
                    max_retries=0,
                    raise_for_status=False,
                    accept=accept,
                )
            except APIConnectionError:
                await trio.sleep(min(2.0**backoff_exponent, BACKOFF_CAP))
                backoff_exponent += 1
                continue

            status = response.status_code
            if status == 429:
                await trio.sleep(min(2.0**backoff_exponent, BACKOFF_CAP))
                backoff_exponent += 1
                continue
            backoff_exponent = 0
            if status != 402:
                billing_since = None

            if 200 <= status < 300:
                consecutive_5xx = 0
                if "application/x-protobuf" in response.headers.get("content-type", ""):
                    return self._decode(decode, response, request_id)
                envelope = self._envelope(response, request_id)
                if envelope.type == "try_again":
                    report(envelope.queue_state, envelope.queue_state_reason)
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
                    await reservations.enter_async_context(self.response_budget.reserve(size))
                    continue
                if envelope.error is not None:
                    raise RequestFailedError(envelope.error, request_id, envelope.category)
                return self._decode(decode, response, request_id)

            if status == 408:
                bad_requests = 0
                consecutive_5xx = 0
                queue = self._queue_body(response)
                if queue is not None and queue.queue_state is not None:
                    report(queue.queue_state, queue.queue_state_reason)
                continue
            if status >= 500:
                consecutive_5xx += 1
                if consecutive_5xx > IMMEDIATE_5XX_REPOLLS:
                    exponent = consecutive_5xx - IMMEDIATE_5XX_REPOLLS - 1
                    await trio.sleep(min(2.0**exponent, BACKOFF_CAP))
                continue
            consecutive_5xx = 0
            if status == 400:
                bad_requests += 1
                if bad_requests > MAX_BAD_REQUEST_POLLS:
                    raise status_error_for(response)
                continue
            if status == 402:
                now = trio.current_time()
                if billing_since is None:
                    billing_since = now
                if now - billing_since >= self.billing_pause_max:
                    error = status_error_for(response)
                    assert isinstance(error, BillingError)
                    raise error
                await trio.sleep(BILLING_RETRY_DELAY)
                continue
            raise status_error_for(response)

    @staticmethod
    def _envelope(response: httpx.Response, request_id: str) -> t.PollEnvelope:
        try:
            return t.decode(response.content, t.PollEnvelope)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise APIError(
                f"invalid result body for request {request_id}: {exc}", request=response.request
            ) from exc

    @staticmethod
    def _queue_body(response: httpx.Response) -> t.QueueStateBody | None:
        try:
            return t.decode(response.content, t.QueueStateBody)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None

    @staticmethod
    def _decode(decode: ResultDecoder[T], response: httpx.Response, request_id: str) -> T:
        try:
            return decode(response)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            raise APIError(
                f"invalid result for request {request_id}: {exc}", request=response.request
            ) from exc


@final
class APIFuture(Generic[T]):
    """The result of a submitted request, available later.

    Returned as soon as a request is queued, so a caller can submit several requests back to
    back (pipelining) and await them afterwards. Its polling runs as a task in the service
    nursery, from the moment it is created; the result is cached.

    Synopsis::

        fut = await training.forward_backward(data, "cross_entropy")
        step = await training.optim_step(t.AdamParams(learning_rate=1e-4))
        out = await fut                      # or: await fut.result(timeout=60)

    Error handling: the request's own failure (a status error, `RequestFailedError`, a
    connection error after retries) is stored and raised by every `result()`. If the service
    closes first, `result()` raises `ClientClosedError`.
    """

    def __init__(self, request_type: str) -> None:
        self.request_type = request_type
        self.request_id: str | None = None
        self.queue_state: str = "active"
        self._done = trio.Event()
        self._value: T | None = None
        self._error: BaseException | None = None
        self._created = trio.current_time()

    def done(self) -> bool:
        return self._done.is_set()

    async def result(self, timeout: float | None = None) -> T:
        """Wait for and return the result, or raise the request's error.

        Raises:
            ResultTimeoutError: `timeout` seconds passed first (the request keeps running).
        """
        if timeout is not None and (math.isnan(timeout) or timeout < 0):
            raise ValueError(f"timeout must be a non-negative number of seconds, got {timeout}")
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._done.is_set():
            with trio.move_on_after(math.inf if timeout is None else timeout):
                await self._done.wait()
            if not self._done.is_set():
                raise ResultTimeoutError(
                    f"{self.request_type} result not ready after {timeout} s "
                    f"(request {self.request_id or 'not yet submitted'})"
                )
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def __await__(self) -> Generator[Any, None, T]:
        return self.result().__await__()

    def _set_value(self, value: T) -> None:
        if not self._done.is_set():
            self._value = value
            self._done.set()

    def _set_error(self, error: BaseException) -> None:
        if not self._done.is_set():
            self._error = error
            self._done.set()

    def _on_queue_state(self, state: str, reason: str | None) -> None:
        self.queue_state = state

    async def _run(self, work: Callable[[], Awaitable[T]]) -> None:
        """Run `work` and store its outcome; used as a task in the service nursery.

        Request failures (any `TinkexError`) are stored. Anything else is a bug in the SDK
        and propagates, crashing the service nursery as trio's design asks.
        """
        try:
            value = await work()
        except TinkexError as exc:
            self._set_error(exc)
        except trio.Cancelled:
            self._set_error(_closed_error(self))
            raise
        except BaseException:
            self._set_error(_closed_error(self))
            raise
        else:
            self._set_value(value)

    def __repr__(self) -> str:
        if not self._done.is_set():
            state = f"pending ({self.queue_state})"
        elif self._error is not None:
            state = f"failed: {type(self._error).__name__}"
        else:
            state = "done"
        return f"<APIFuture {self.request_type} {self.request_id or '(unsubmitted)'} {state}>"


def _closed_error(fut: APIFuture[Any]) -> ClientClosedError:
    return ClientClosedError(
        f"the service closed before the {fut.request_type} result "
        f"(request {fut.request_id or 'not yet submitted'}) arrived; await futures inside "
        "the `async with open_service(...)` block"
    )


def completed_future(request_type: str, value: T) -> APIFuture[T]:
    """A future that already holds `value` (for results known without a request)."""
    fut: APIFuture[T] = APIFuture(request_type)
    fut._set_value(value)
    return fut
