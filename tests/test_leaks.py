"""The leak check of `_leaks.py` can fail: a stray task or socket anywhere in the run is seen."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.lowlevel
import trio.testing
from _leaks import assert_nothing_left, holdings


async def _forgotten() -> None:
    await trio.sleep_forever()


async def test_a_task_left_in_a_nursery_the_test_never_sees_is_reported() -> None:
    before = holdings()
    # A system task: a child of trio's own nursery, far from the test's.
    trio.lowlevel.spawn_system_task(_forgotten, name="forgotten-system-task")
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(AssertionError, match="forgotten-system-task"):
        assert_nothing_left(before)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_forgotten, name="forgotten-child")
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(AssertionError, match="forgotten-child"):
            assert_nothing_left(before)
        nursery.cancel_scope.cancel()


async def test_a_socket_left_open_is_reported() -> None:
    before = holdings()
    a, b = socket.socketpair()
    try:
        with pytest.raises(AssertionError, match="2 sockets left open"):
            assert_nothing_left(before)
    finally:
        a.close()
        b.close()
    assert_nothing_left(before)


async def test_ended_tasks_and_closed_sockets_leave_nothing() -> None:
    before = holdings()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 0)
    a, b = socket.socketpair()
    a.close()
    b.close()
    assert_nothing_left(before)
