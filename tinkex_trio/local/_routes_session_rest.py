"""Session REST endpoints beyond get/list (PROTOCOL.md 3.5, 7.9): project assignment, trace
exports and the experimental session search. Routed from `RestRoutes`.

Trace export: the first `GET sessions/{id}/trace_export` starts building a JSON file (the
session, its training runs and sampling sessions, and every request it made: type, ids,
seq_id, state, times, error and category, never result payloads) and answers `pending`; once
written, the answer is `ready` with a signed URL `/trace_exports/<token>.json?expires=&signature=`
served by this server (signed like the archive URLs). A ready export is handed out again for
`TRACE_EXPORT_REUSE` seconds; after that the next request builds a fresh one, so an export
asked for later shows later activity. A build that fails answers `failed` with the error once,
and the next request starts over.

Search (7.9): every filter is applied in Python over all sessions (a local backend has few).
Statuses: a session with no finish is `active`; a finished one is `client_finished` with the
reason the client gave. This backend never cancels or fails a session, so filters for
`cancelled` and `failed` match nothing. Every session belongs to the one local user, so owner
`own` and `accessible` match all, and `user` matches when `tml:user:local` is listed.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal

import msgspec
import trio

from tinkex_trio.types import (
    SESSION_SEARCH_MAX_LIMIT,
    UNSET,
    AssignSessionProjectRequest,
    ClientFinishedReason,
    SearchOwnerUsers,
    SearchStatusActive,
    SearchStatusClientFinished,
    SessionSearchCursor,
    SessionSearchRequest,
    SessionSearchResponse,
    SessionStatus,
    SessionStatusActive,
    SessionStatusClientFinished,
    SessionSummary,
    SessionTraceExportResponse,
    decode_request,
)

from ._archive import ARCHIVE_URL_TTL
from ._backend import API, Backend, now, utc_datetime
from ._http import Handler, HTTPError, Request, Response, json_response
from ._store import SessionRow

logger = logging.getLogger("tinkex_trio.local.trace_export")

#: The owner reported for every session and run: the local backend has one user.
LOCAL_OWNER: Final = "tml:user:local"
TRACE_ROUTE_PREFIX: Final = "/trace_exports/"
#: Seconds a ready export is handed out again before a new request rebuilds it.
TRACE_EXPORT_REUSE: Final = 60.0
#: Lifetime of a signed trace URL (as for archives).
TRACE_URL_TTL: Final = ARCHIVE_URL_TTL

_SESSION = r"(?P<session_id>[^/]+)"
_FINISH_REASONS: Final = ("success", "errored", "interrupted")


@dataclass
class _TraceExport:
    status: Literal["pending", "ready", "failed"]
    token: str
    started_at: float
    error: str | None = None


class SessionRestRoutes:
    """`sessions/{id}/project`, `sessions/{id}/trace_export` (+ its files), `sessions/search`."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._exports: dict[str, _TraceExport] = {}

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("PUT", f"{API}/sessions/{_SESSION}/project", self.assign_project),
            ("GET", f"{API}/sessions/{_SESSION}/trace_export", self.trace_export),
            ("POST", f"{API}/sessions/search", self.search),
            ("GET", f"{TRACE_ROUTE_PREFIX}(?P<token>[0-9a-f]{{32}}\\.json)", self.trace_file),
        ]

    def _session(self, session_id: str) -> SessionRow:
        session = self.backend.store.get_session(session_id)
        if session is None:
            raise HTTPError(404, f"unknown session_id {session_id!r}")
        return session

    # ------------------------------------------------------------------ project

    async def assign_project(self, request: Request) -> Response:
        session = self._session(request.params["session_id"])
        body = decode_request(request.body, AssignSessionProjectRequest)
        if not body.project_id.strip():
            raise HTTPError(400, "project_id must be a non-empty string")
        self.backend.store.set_session_project(session.session_id, body.project_id)
        await trio.lowlevel.checkpoint()
        return json_response({})

    # ------------------------------------------------------------- trace export

    def _trace_dir(self) -> Path:
        return self.backend.settings.data_dir / "traces"

    async def trace_export(self, request: Request) -> Response:
        session = self._session(request.params["session_id"])
        export = self._exports.get(session.session_id)
        if export is not None and export.status == "failed":
            del self._exports[session.session_id]
            return json_response(SessionTraceExportResponse(status="failed", error=export.error))
        if export is not None and export.status == "ready":
            if now() - export.started_at <= TRACE_EXPORT_REUSE:
                expires = int(now() + TRACE_URL_TTL)
                path = TRACE_ROUTE_PREFIX + export.token
                url = self.backend.signed_url(request.base_url(), path, expires)
                return json_response(SessionTraceExportResponse(status="ready", url=url))
            (self._trace_dir() / export.token).unlink(missing_ok=True)
            export = None
        if export is None:
            export = _TraceExport("pending", f"{uuid.uuid4().hex}.json", now())
            self._exports[session.session_id] = export
            self.backend.nursery.start_soon(self._build_trace, session.session_id, export)
        await trio.lowlevel.checkpoint()
        return json_response(SessionTraceExportResponse(status="pending"))

    def _trace_document(self, session_id: str) -> dict[str, Any]:
        store = self.backend.store
        session = self._session(session_id)
        runs = [store.get_model(m) for m in store.models_of_session(session_id)]
        samplers = [store.get_sampling_session(s) for s in store.samplers_of_session(session_id)]
        return {
            "session": {
                "session_id": session.session_id,
                "created_at": session.created_at,
                "project_id": session.project_id,
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
            "exported_at": now(),
        }

    async def _build_trace(self, session_id: str, export: _TraceExport) -> None:
        """Gather the rows (on the trio thread: the store is not thread-safe), then write."""
        await trio.lowlevel.checkpoint()
        try:
            document = json.dumps(self._trace_document(session_id), indent=1).encode()
            directory = self._trace_dir()
            await trio.to_thread.run_sync(_write_atomically, directory, export.token, document)
        except (OSError, HTTPError) as exc:
            logger.exception("trace export of session %s failed", session_id)
            export.status, export.error = "failed", f"could not write the trace export: {exc}"
            return
        export.status = "ready"

    async def trace_file(self, request: Request) -> Response:
        token = request.params["token"]
        path = TRACE_ROUTE_PREFIX + token
        self.backend.check_signed_url(request, path, what="trace", renew="export the trace again")
        try:
            content = await trio.Path(self._trace_dir() / token).read_bytes()
        except FileNotFoundError:
            raise HTTPError(404, "this trace export no longer exists; export again") from None
        return Response(body=content)

    # ------------------------------------------------------------------- search

    async def search(self, request: Request) -> Response:
        body = decode_request(request.body, SessionSearchRequest)
        if not 1 <= body.limit <= SESSION_SEARCH_MAX_LIMIT:
            raise HTTPError(
                400, f"limit must be in 1..{SESSION_SEARCH_MAX_LIMIT}, got {body.limit}"
            )
        if isinstance(body.owner, SearchOwnerUsers) and not 1 <= len(body.owner.owner_urns) <= 10:
            raise HTTPError(400, "owner.owner_urns must hold 1..10 owner URNs")
        if body.statuses is not UNSET:
            for status in body.statuses:
                if isinstance(status, SearchStatusClientFinished) and status.reasons == []:
                    raise HTTPError(400, "statuses: client_finished reasons must be non-empty")
        matched: list[SessionSummary] = []
        more = False
        for session in self.backend.store.all_sessions():
            created = utc_datetime(session.created_at)
            if body.cursor is not UNSET and not _after(created, session.session_id, body.cursor):
                continue
            if not _matches(body, session):
                continue
            if len(matched) == body.limit:
                more = True
                break
            matched.append(self._summary(session, created))
        next_cursor = None
        if more:
            last = matched[-1]
            next_cursor = SessionSearchCursor(
                last_created_at=last.created_at, last_session_id=last.session_id
            )
        await trio.lowlevel.checkpoint()
        return json_response(SessionSearchResponse(sessions=matched, next_cursor=next_cursor))

    def _summary(self, session: SessionRow, created: datetime) -> SessionSummary:
        count, size = self.backend.store.checkpoint_stats_of_session(session.session_id)
        return SessionSummary(
            session_id=session.session_id,
            created_at=created,
            owner=LOCAL_OWNER,
            project_id=session.project_id,
            checkpoints_count=count,
            status=_status(session),
            display_name=session.display_name,
            user_metadata=session.user_metadata,
            checkpoint_storage_bytes=size,
        )


def _write_atomically(directory: Path, name: str, content: bytes) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}.tmp"
    tmp.write_bytes(content)
    tmp.replace(directory / name)


def _status(session: SessionRow) -> SessionStatus:
    if session.finished_reason is None:
        return SessionStatusActive()
    reason = session.finished_reason
    if reason not in _FINISH_REASONS:
        reason = "success"
    return SessionStatusClientFinished(
        reason=msgspec.convert({"type": reason}, ClientFinishedReason)
    )


def _after(created: datetime, session_id: str, cursor: SessionSearchCursor) -> bool:
    """Whether a session comes after the cursor in newest-first order."""
    return (created, session_id) < (cursor.last_created_at, cursor.last_session_id)


def _words(text: str) -> list[str]:
    return text.casefold().split()


def _display_name_matches(query: str, display_name: str | None) -> bool:
    """Case-insensitive, word-wise substring match: every word of the query is a substring
    of some word of the display name (`"night run"` matches `"Nightly RL run 3"`)."""
    if display_name is None:
        return False
    words = _words(display_name)
    return all(any(q in w for w in words) for q in _words(query))


def _matches(body: SessionSearchRequest, session: SessionRow) -> bool:
    if isinstance(body.owner, SearchOwnerUsers) and LOCAL_OWNER not in body.owner.owner_urns:
        return False
    if body.project_ids is not UNSET and session.project_id not in body.project_ids:
        return False
    if body.user_metadata is not UNSET:
        metadata = session.user_metadata or {}
        if any(metadata.get(k) != v for k, v in body.user_metadata.items()):
            return False
    by_id = body.session_id is not UNSET
    by_name = body.display_name is not UNSET
    if by_id or by_name:
        id_hit = by_id and session.session_id == body.session_id
        name_hit = by_name and _display_name_matches(str(body.display_name), session.display_name)
        if not (id_hit or name_hit):
            return False
    if body.statuses is not UNSET:
        status = _status(session)
        if not any(_status_matches(f, status) for f in body.statuses):
            return False
    return True


def _status_matches(wanted: object, status: SessionStatus) -> bool:
    if isinstance(wanted, SearchStatusActive):
        return isinstance(status, SessionStatusActive)
    if isinstance(wanted, SearchStatusClientFinished):
        if not isinstance(status, SessionStatusClientFinished):
            return False
        return wanted.reasons is UNSET or status.reason.type in wanted.reasons
    return False  # cancelled / failed: never produced by this backend
