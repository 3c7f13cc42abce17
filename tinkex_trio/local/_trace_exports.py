"""Session trace exports (PROTOCOL.md 3.5 `sessions/{id}/trace_export`).

The first request for a session's trace starts building a JSON file (the session, its training
runs and sampling sessions, and every request it made: type, ids, seq_id, state, times, error
and category, never result payloads) and is answered `pending`; once written, the answer is
`ready` with a signed URL `/trace_exports/<token>.json?expires=&signature=` served by this
server. A ready export is handed out again for `TRACE_EXPORT_REUSE` seconds; after that the next
request builds a fresh one, so an export asked for later shows later activity. A build that
fails answers `failed` with the error once, and the next request starts over.

Files live in `<data_dir>/traces/`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import trio

from ._backend import project_of
from ._durable import write_file_atomically
from ._store import Store

logger = logging.getLogger("tinkex_trio.local.trace_export")

#: Seconds a ready export is handed out again before a new request rebuilds it.
TRACE_EXPORT_REUSE: Final = 60.0


@dataclass
class TraceExport:
    status: Literal["pending", "ready", "failed"]
    token: str
    """The file name (`<hex>.json`)."""
    started_at: float
    error: str | None = None


class TraceExports:
    """The trace exports of one data directory: at most one current export per session."""

    def __init__(self, directory: Path, store: Store) -> None:
        self._directory = directory
        self._store = store
        self._exports: dict[str, TraceExport] = {}

    def path_for(self, token: str) -> Path:
        return self._directory / token

    def current(self, session_id: str, nursery: trio.Nursery) -> TraceExport:
        """The session's export as a client should see it now, starting a build (in
        `nursery`) if there is none or the ready one is too old. A failed export is reported
        once and then forgotten."""
        export = self._exports.get(session_id)
        if export is not None and export.status == "failed":
            del self._exports[session_id]
            return export
        if export is not None and export.status == "ready":
            if time.time() - export.started_at <= TRACE_EXPORT_REUSE:
                return export
            self.path_for(export.token).unlink(missing_ok=True)
            export = None
        if export is None:
            export = TraceExport("pending", f"{uuid.uuid4().hex}.json", time.time())
            self._exports[session_id] = export
            nursery.start_soon(self._build, session_id, export)
        return export

    def _document(self, session_id: str) -> dict[str, Any]:
        store = self._store
        session = store.get_session(session_id)
        if session is None:
            raise LookupError(f"session {session_id!r} no longer exists")
        runs = [store.get_model(m) for m in store.models_of_session(session_id)]
        samplers = [store.get_sampling_session(s) for s in store.samplers_of_session(session_id)]
        return {
            "session": {
                "session_id": session.session_id,
                "created_at": session.created_at,
                "project_id": project_of(session),
                "display_name": session.display_name,
                "tags": session.tags,
                "user_metadata": session.user_metadata,
                "finished_reason": session.finished_reason,
            },
            "training_runs": [
                {
                    "training_run_id": r.model_id,
                    "base_model": r.base_model,
                    "lora_config": r.lora_config,
                    "created_at": r.created_at,
                }
                for r in runs
                if r is not None
            ],
            "sampling_sessions": [
                {
                    "sampling_session_id": s.sampling_session_id,
                    "base_model": s.base_model,
                    "model_path": s.model_path,
                    "created_at": s.created_at,
                }
                for s in samplers
                if s is not None
            ],
            "requests": store.futures_of_session(session_id),
            "exported_at": time.time(),
        }

    async def _build(self, session_id: str, export: TraceExport) -> None:
        """Gather the rows (on the trio thread: the store is not thread-safe), then write."""
        await trio.lowlevel.checkpoint()
        try:
            document = json.dumps(self._document(session_id), indent=1).encode()
            await trio.to_thread.run_sync(
                _write_atomically, self._directory, export.token, document
            )
        except (OSError, LookupError) as exc:
            logger.exception("trace export of session %s failed", session_id)
            export.status, export.error = "failed", f"could not write the trace export: {exc}"
            return
        export.status = "ready"


def _write_atomically(directory: Path, name: str, content: bytes) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_file_atomically(directory / name, content)
