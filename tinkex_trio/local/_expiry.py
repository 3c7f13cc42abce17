"""Session expiry: a session whose client stopped heart-beating is finished as expired.

The SDK heartbeats every 10 s (PROTOCOL.md 9.7); a client that crashed, lost its network or
was killed never finishes its session, and without expiry its adapters would stay in the
engine for ever. `SessionExpiry` remembers when each open session was last seen (created,
heart-beaten, or used by a request) on trio's clock, and calls `expire(session_id)` once
`timeout` seconds pass without a sign of life. The backend then finishes it with reason
`expired` and releases what it holds (`Backend.release_session`); a heartbeat after that is
answered 410, which tells the SDK its session is gone.

One task sleeps until the earliest deadline: a session seen again only moves its deadline
later, so the earliest one never moves earlier, and nothing polls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

__all__ = ["SessionExpiry"]

logger = logging.getLogger("tinkex_trio.local.expiry")


class SessionExpiry:
    """Deadlines of open sessions (see the module docstring); `timeout=None`: never expire."""

    def __init__(self, timeout: float | None, expire: Callable[[str], None]) -> None:
        self.timeout = timeout
        self._expire = expire
        self._last_seen: dict[str, float] = {}
        self._added = trio.Event()

    def __len__(self) -> int:
        return len(self._last_seen)

    def start(self, session_id: str) -> None:
        """Track an open session (created, or found open at start-up) from now."""
        if self.timeout is None:
            return
        self._last_seen[session_id] = trio.current_time()
        self._added.set()

    def seen(self, session_id: str) -> None:
        """A sign of life of a tracked session: its deadline is `timeout` from now. A session
        not tracked (finished or expired) stays so."""
        if session_id in self._last_seen:
            self._last_seen[session_id] = trio.current_time()

    def forget(self, session_id: str) -> None:
        """The session finished: it no longer expires."""
        self._last_seen.pop(session_id, None)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if self.timeout is None:
            return
        while True:
            if not self._last_seen:
                self._added = trio.Event()
                await self._added.wait()
                continue
            session_id, seen = min(self._last_seen.items(), key=lambda item: item[1])
            deadline = seen + self.timeout
            if trio.current_time() < deadline:
                await trio.sleep_until(deadline)
                continue
            del self._last_seen[session_id]
            logger.info(
                "session %s sent no heartbeat for %g s: finished as expired",
                session_id,
                self.timeout,
            )
            self._expire(session_id)
