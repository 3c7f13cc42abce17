"""`APIFuture`: the result of a submitted request, available later (PROTOCOL.md 4, 4.10).

A training method returns one as soon as its request is queued; the request's submission and
the polling of its result (`tinkex_trio._polling`) run as a task in the service nursery, and
the outcome is stored here for every `await fut` / `await fut.result(timeout=...)`.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Generic, TypeVar, final

import trio

from tinkex_trio.errors import ClientClosedError, ResultTimeoutError, TinkexError

__all__ = ["APIFuture"]

_T = TypeVar("_T")


@final
class APIFuture(Generic[_T]):
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
        self._value: _T | None = None
        self._error: BaseException | None = None
        self._created = trio.current_time()

    def done(self) -> bool:
        return self._done.is_set()

    async def result(self, timeout: float | None = None) -> _T:
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

    def __await__(self) -> Generator[Any, None, _T]:
        return self.result().__await__()

    def _set_value(self, value: _T) -> None:
        if not self._done.is_set():
            self._value = value
            self._done.set()

    def _set_error(self, error: BaseException) -> None:
        if not self._done.is_set():
            self._error = error
            self._done.set()

    def _on_queue_state(self, state: str, reason: str | None) -> None:
        self.queue_state = state

    async def _run(self, work: Callable[[], Awaitable[_T]]) -> None:
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
