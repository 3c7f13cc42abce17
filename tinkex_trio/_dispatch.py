"""Sampling back-pressure: the shared 429 window and the dispatch limits (PROTOCOL.md 9.5).

Thousands of `sample()` calls may run at once. A 429 on `asample` is the server saying "back
off", so one 429 pauses every dispatch of the service (all its sampling clients, one API key),
and a success clears the pause. While paused and for a while after, fewer submissions may be in
flight and each counts for more bytes, so the queue drains gently instead of stampeding.
"""

from __future__ import annotations

import math
from typing import Final, final

import msgspec
import trio

from tinkex_trio._limits import ByteBudget

# PROTOCOL.md 9.5: the back-off window after a 429 (5 s for prompts over 128 KiB).
BACKOFF_WINDOW: Final = 1.0
LARGE_PROMPT_BACKOFF_WINDOW: Final = 5.0
LARGE_PROMPT_BYTES: Final = 128 * 1024
# PROTOCOL.md 9.5: at most 400 concurrent submissions; 10 during a back-off and for 10 s after.
MAX_CONCURRENT_SUBMITS: Final = 400
MAX_CONCURRENT_SUBMITS_BACKING_OFF: Final = 10
BACKOFF_COOLDOWN: Final = 10.0
# PROTOCOL.md 9.5: while backing off, each prompt's byte estimate counts 20 times.
BACKOFF_BYTES_MULTIPLIER: Final = 20
# PROTOCOL.md 9.5: 10 bytes per text token for the sampling byte estimate.
SAMPLE_BYTES_PER_TOKEN: Final = 10


class RateLimiterStatistics(msgspec.Struct, frozen=True, kw_only=True):
    backing_off: bool
    seconds_left: float
    in_flight: int
    limit: int
    rate_limited_total: int


@final
class RateLimiter:
    """The service-wide 429 window plus the concurrent-submission limit.

    Synopsis::

        async with limiter.dispatch(estimated_bytes):
            response = await post_asample(...)
        if response.status_code == 429:
            limiter.on_rate_limited(estimated_bytes)
        else:
            limiter.on_success()

    The window is a deadline on trio's clock; waiters sleep until it passes (not in 1 s steps
    as the official SDK does: sleeping to the deadline wakes them at the same moment with less
    work). No lock is held while a result is polled: `dispatch` covers the submit only.
    """

    def __init__(self, byte_budget: int = 10_485_760) -> None:
        self._backoff_until = -float("inf")
        self._cooldown_until = -float("inf")
        self._in_flight = 0
        self._rate_limited_total = 0
        # Tasks waiting for a submission slot, in arrival order; a released slot is handed to
        # the first of them (one wake-up per release, never a stampede of all waiters).
        self._waiters = trio.lowlevel.ParkingLot()
        self._bytes = ByteBudget(byte_budget)

    def _backing_off(self, now: float) -> bool:
        return now < self._cooldown_until

    def _limit(self, now: float) -> int:
        return (
            MAX_CONCURRENT_SUBMITS_BACKING_OFF if self._backing_off(now) else MAX_CONCURRENT_SUBMITS
        )

    async def wait_window(self) -> None:
        """Wait until no 429 back-off window is open."""
        while True:
            left = self._backoff_until - trio.current_time()
            if left <= 0:
                await trio.lowlevel.checkpoint()
                return
            await trio.sleep(left)

    def dispatch(self, estimated_bytes: int) -> _Dispatch:
        """Hold one submission slot (and its bytes) for the duration of a submit.

        Fast path: no window open, a slot free, nobody waiting and room in the byte budget: the
        slot and the bytes are taken without a checkpoint (the submit that follows is one).
        Otherwise wait for the window, then for a slot (first come, first served), then for
        the bytes.
        """
        return _Dispatch(self, estimated_bytes)

    def _take_nowait(self, estimated_bytes: int) -> bool:
        now = trio.current_time()
        if (
            now < self._backoff_until
            or self._backing_off(now)
            or self._waiters
            or self._in_flight >= MAX_CONCURRENT_SUBMITS
        ):
            return False
        try:
            self._bytes.acquire_nowait(estimated_bytes)
        except trio.WouldBlock:
            return False
        self._in_flight += 1
        return True

    async def _take_slot(self) -> None:
        await self.wait_window()
        now = trio.current_time()
        if not self._waiters and self._in_flight < self._limit(now):
            self._in_flight += 1
            return
        while True:
            # The limit rises when the cool-down ends: wake up then, too.
            wake_at = self._cooldown_until if self._backing_off(now) else math.inf
            with trio.move_on_at(wake_at) as scope:
                await self._waiters.park()
            if not scope.cancelled_caught:
                return  # `_release_slot` handed its slot over: `_in_flight` still counts it
            now = trio.current_time()
            if self._in_flight < self._limit(now):
                self._in_flight += 1
                return

    def _release_slot(self) -> None:
        if self._waiters and self._in_flight - 1 < self._limit(trio.current_time()):
            self._waiters.unpark()  # the slot passes to the first waiter
        else:
            self._in_flight -= 1

    def on_rate_limited(self, estimated_bytes: int = 0) -> None:
        """A 429 (or a 402 billing pause): open the window for every caller."""
        now = trio.current_time()
        window = (
            LARGE_PROMPT_BACKOFF_WINDOW if estimated_bytes > LARGE_PROMPT_BYTES else BACKOFF_WINDOW
        )
        self._backoff_until = max(self._backoff_until, now + window)
        self._cooldown_until = max(self._cooldown_until, self._backoff_until + BACKOFF_COOLDOWN)
        self._rate_limited_total += 1

    def on_success(self) -> None:
        """A submit went through: close the window (the cool-down still applies)."""
        self._backoff_until = -float("inf")

    def statistics(self) -> RateLimiterStatistics:
        now = trio.current_time()
        return RateLimiterStatistics(
            backing_off=now < self._backoff_until,
            seconds_left=max(0.0, self._backoff_until - now),
            in_flight=self._in_flight,
            limit=self._limit(now),
            rate_limited_total=self._rate_limited_total,
        )

    def __repr__(self) -> str:
        s = self.statistics()
        state = f"backing off {s.seconds_left:.2f}s" if s.backing_off else "open"
        return f"<RateLimiter {state}, {s.in_flight}/{s.limit} in flight>"


@final
class _Dispatch:
    """`RateLimiter.dispatch`'s context manager: a class, not a generator, because it runs
    around every sample submission."""

    __slots__ = ("_estimated", "_limiter", "_weight")

    def __init__(self, limiter: RateLimiter, estimated_bytes: int) -> None:
        self._limiter = limiter
        self._estimated = estimated_bytes
        self._weight = estimated_bytes

    async def __aenter__(self) -> None:
        limiter = self._limiter
        if limiter._take_nowait(self._estimated):
            return
        await limiter._take_slot()
        weight = self._estimated
        if limiter._backing_off(trio.current_time()):
            weight *= BACKOFF_BYTES_MULTIPLIER
        try:
            await limiter._bytes.acquire(weight)
        except BaseException:
            limiter._release_slot()
            raise
        self._weight = weight

    async def __aexit__(self, *exc_info: object) -> None:
        # Synchronous release: completes even under cancellation, no shield needed.
        self._limiter._bytes.release(self._weight)
        self._limiter._release_slot()
