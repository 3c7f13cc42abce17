"""What a test run holds, to prove that nothing outlives an `open_service` block.

Synopsis::

    before = holdings()
    async with open_service(...) as service:
        ...
    assert_nothing_left(before)

`holdings()` walks every task of the trio run from `trio.lowlevel.current_root_task()` down
through the child nurseries (so a task left in *any* nursery counts, not only in one the test
can see), and lists every open socket of the process (the file descriptors in ``/dev/fd`` that
`os.fstat` says are sockets, on both the client's and an in-process server's side).
`assert_nothing_left(before)` fails, naming the extra tasks and counting the extra sockets,
unless both sets are exactly what they were.
"""

from __future__ import annotations

import dataclasses
import os
import stat

import trio
import trio.lowlevel


@dataclasses.dataclass(frozen=True)
class Holdings:
    tasks: frozenset[trio.lowlevel.Task]
    sockets: frozenset[tuple[int, int]]
    """(device, inode) of each open socket: stable while it is open, unlike its fd number."""


def _tasks() -> frozenset[trio.lowlevel.Task]:
    root = trio.lowlevel.current_root_task()
    assert root is not None, "holdings() must be called inside trio.run"
    found: set[trio.lowlevel.Task] = set()
    todo = [root]
    while todo:
        task = todo.pop()
        found.add(task)
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return frozenset(found)


def _sockets() -> frozenset[tuple[int, int]]:
    found: set[tuple[int, int]] = set()
    for name in os.listdir("/dev/fd"):
        try:
            info = os.fstat(int(name))
        except OSError:  # the directory listing's own fd, closed by now
            continue
        if stat.S_ISSOCK(info.st_mode):
            found.add((info.st_dev, info.st_ino))
    return frozenset(found)


def holdings() -> Holdings:
    """Every task of this trio run and every open socket of this process, now."""
    return Holdings(tasks=_tasks(), sockets=_sockets())


def assert_nothing_left(before: Holdings) -> None:
    """Fail unless the run holds exactly the tasks and sockets it held at `before`."""
    now = holdings()
    extra_tasks = sorted(task.name for task in now.tasks - before.tasks)
    extra_sockets = len(now.sockets - before.sockets)
    problems = []
    if extra_tasks:
        problems.append(f"tasks left running: {extra_tasks}")
    if extra_sockets:
        problems.append(f"{extra_sockets} sockets left open")
    assert not problems, "; ".join(problems)
