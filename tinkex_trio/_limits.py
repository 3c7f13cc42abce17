"""Byte budgets for in-flight work, and the size estimates they count (PROTOCOL.md 4.4, 9.1, 9.5)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import final

import msgspec
import trio

from tinkex_trio import types as t


def estimate_model_input_bytes(model_input: t.ModelInput, bytes_per_token: int) -> int:
    """A model input's estimated size: `bytes_per_token` per text token, an image's data, an
    image pointer's location (PROTOCOL.md 9.1 counts 4 per token, 9.5 counts 10)."""
    size = 0
    for chunk in model_input.chunks:
        if isinstance(chunk, t.EncodedTextChunk):
            size += bytes_per_token * chunk.length
        elif isinstance(chunk, t.ImageChunk):
            size += len(chunk.data)
        else:
            size += len(chunk.location)
    return size


class ByteBudgetStatistics(msgspec.Struct, frozen=True, kw_only=True):
    capacity: int
    in_use: int
    waiting: int


@final
class ByteBudget:
    """A semaphore counted in bytes, shared by every request of one service.

    A reservation waits while the budget is already exhausted, but one that starts while there
    is room may overshoot it: the official SDK does the same, so a single payload larger than
    the whole budget still goes through instead of waiting forever.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"ByteBudget capacity must be > 0, got {capacity}")
        self._capacity = capacity
        self._in_use = 0
        self._waiting = 0
        self._released = trio.Event()

    async def acquire(self, nbytes: int) -> None:
        """Reserve `nbytes` until `release(nbytes)`; for holds that span tasks."""
        await trio.lowlevel.checkpoint()
        while self._in_use >= self._capacity:
            self._waiting += 1
            try:
                await self._released.wait()
            finally:
                self._waiting -= 1
        self._in_use += nbytes

    def acquire_nowait(self, nbytes: int) -> None:
        """Reserve `nbytes` at once if there is room and nobody waits; else `trio.WouldBlock`."""
        if self._waiting or self._in_use >= self._capacity:
            raise trio.WouldBlock
        self._in_use += nbytes

    def release(self, nbytes: int) -> None:
        """Give back what `acquire` reserved and wake the waiters (if any)."""
        self._in_use -= nbytes
        if self._waiting:
            released, self._released = self._released, trio.Event()
            released.set()

    @asynccontextmanager
    async def reserve(self, nbytes: int) -> AsyncIterator[None]:
        await self.acquire(nbytes)
        try:
            yield
        finally:
            self.release(nbytes)

    def statistics(self) -> ByteBudgetStatistics:
        return ByteBudgetStatistics(
            capacity=self._capacity, in_use=self._in_use, waiting=self._waiting
        )

    def __repr__(self) -> str:
        return f"<ByteBudget {self._in_use}/{self._capacity} bytes, {self._waiting} waiting>"
