"""Sessions: create, heartbeat, finish (PROTOCOL.md 2.2, 3.1), and their REST endpoints (3.5,
7.9): listing, get, project assignment, trace exports (`_trace_exports.py`) and the experimental
session search.

Search (7.9): every filter is applied in Python over all sessions (a local backend has few).
Statuses: a session with no finish is `active`; a finished one is `client_finished` with the
reason the client gave; one that stopped heart-beating for `session_timeout` is `cancelled`
(expired). This backend never fails a session, so filters for `failed` match nothing. Every session belongs to the one local user, so owner
`own` and `accessible` match all, and `user` matches when `tml:user:local` is listed.
Projects: a session created without a project, and never assigned one, is in
`DEFAULT_PROJECT_ID` (`local-default`), so `project_id` is never null.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Final

import msgspec
import trio

from tinkex_trio.types import (
    SESSION_SEARCH_MAX_LIMIT,
    UNSET,
    AssignSessionProjectRequest,
    ClientFinishedReason,
    CreateSessionRequest,
    CreateSessionResponse,
    EmptyResponse,
    GetSessionResponse,
    ListSessionsResponse,
    SearchOwnerUsers,
    SearchStatusActive,
    SearchStatusCancelled,
    SearchStatusClientFinished,
    SessionHeartbeatRequest,
    SessionHeartbeatResponse,
    SessionSearchCursor,
    SessionSearchRequest,
    SessionSearchResponse,
    SessionStatus,
    SessionStatusActive,
    SessionStatusCancelled,
    SessionStatusClientFinished,
    SessionSummary,
    SessionTraceExportResponse,
    decode_request,
)

from ._backend import API, EXPIRED_REASON, LOCAL_OWNER, MAX_PAGE_LIMIT, Backend, now, project_of
from ._checkpoints import utc_datetime
from ._convert import or_none
from ._http import Handler, HTTPError, Request, Response, int_query, json_response
from ._store import SessionRow
from ._trace_exports import TraceExports

TRACE_ROUTE_PREFIX: Final = "/trace_exports/"
#: Default page size of the session listing (PROTOCOL.md 3.5).
DEFAULT_SESSIONS_LIMIT: Final = 20

_SESSION = r"(?P<session_id>[^/]+)"
_FINISH_REASONS: Final = ("success", "errored", "interrupted")


class SessionRoutes:
    """The session endpoints; state and shared lookups live in `Backend`."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.traces = TraceExports(backend.settings.data_dir / "traces", backend.store)

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("POST", f"{API}/create_session", self.create_session),
            ("POST", f"{API}/session_heartbeat", self.session_heartbeat),
            ("POST", f"{API}/sessions/{_SESSION}/finish", self.finish_session),
            ("GET", f"{API}/sessions", self.list_sessions),
            ("GET", f"{API}/sessions/{_SESSION}", self.get_session),
            ("PUT", f"{API}/sessions/{_SESSION}/project", self.assign_project),
            ("GET", f"{API}/sessions/{_SESSION}/trace_export", self.trace_export),
            ("POST", f"{API}/sessions/search", self.search),
            ("GET", f"{TRACE_ROUTE_PREFIX}(?P<token>[0-9a-f]{{32}}\\.json)", self.trace_file),
        ]

    # --------------------------------------------------------------- lifecycle

    async def create_session(self, request: Request) -> Response:
        body = decode_request(request.body, CreateSessionRequest)
        session_id = str(uuid.uuid4())
        self.backend.store.insert_session(
            session_id,
            created_at=now(),
            tags=list(body.tags),
            user_metadata=body.user_metadata,
            project_id=or_none(body.project_id),
            display_name=or_none(body.display_name),
            sdk_version=body.sdk_version,
        )
        self.backend.expiry.start(session_id)
        return json_response(CreateSessionResponse(session_id=session_id))

    async def session_heartbeat(self, request: Request) -> Response:
        body = decode_request(request.body, SessionHeartbeatRequest)
        session = self.backend.store.get_session(body.session_id)
        if session is None:
            raise HTTPError(404, f"unknown session_id {body.session_id!r}")
        if session.finished_reason is not None:
            raise HTTPError(410, f"session {body.session_id!r} is finished")
        self.backend.store.heartbeat(body.session_id, now())
        self.backend.session_seen(body.session_id)
        return json_response(SessionHeartbeatResponse())

    async def finish_session(self, request: Request) -> Response:
        session_id = request.params["session_id"]
        self.backend.session(session_id)
        reason = "success"
        if request.body.strip():
            raw: object = decode_request(request.body, dict[str, Any])
            if isinstance(raw, dict) and isinstance(raw.get("reason"), dict):
                reason = str(raw["reason"].get("type", "success"))
        if self.backend.session(session_id).finished_reason is None:
            self.backend.finish_session(session_id, reason)
        return json_response(EmptyResponse())

    # -------------------------------------------------------------------- REST

    def _session(self, request: Request) -> SessionRow:
        session_id = request.params["session_id"]
        session = self.backend.store.get_session(session_id)
        if session is None:
            raise HTTPError(404, f"unknown session_id {session_id!r}")
        return session

    async def list_sessions(self, request: Request) -> Response:
        limit = int_query(request, "limit", DEFAULT_SESSIONS_LIMIT, 1, MAX_PAGE_LIMIT)
        offset = int_query(request, "offset", 0, 0, 2**31)
        ids, _total = self.backend.store.list_sessions(limit=limit, offset=offset)
        return json_response(ListSessionsResponse(sessions=ids))

    async def get_session(self, request: Request) -> Response:
        session = self._session(request)
        store = self.backend.store
        return json_response(
            GetSessionResponse(
                training_run_ids=store.models_of_session(session.session_id),
                sampler_ids=store.samplers_of_session(session.session_id),
                user_metadata=session.user_metadata,
                display_name=session.display_name,
            )
        )

    async def assign_project(self, request: Request) -> Response:
        session = self._session(request)
        body = decode_request(request.body, AssignSessionProjectRequest)
        if not body.project_id.strip():
            raise HTTPError(400, "project_id must be a non-empty string")
        self.backend.store.set_session_project(session.session_id, body.project_id)
        await trio.lowlevel.checkpoint()
        return json_response(EmptyResponse())

    # ------------------------------------------------------------- trace export

    async def trace_export(self, request: Request) -> Response:
        session = self._session(request)
        export = self.traces.current(session.session_id, self.backend.nursery)
        await trio.lowlevel.checkpoint()
        if export.status == "failed":
            return json_response(SessionTraceExportResponse(status="failed", error=export.error))
        if export.status == "ready":
            urls = self.backend.urls
            url = urls.make(request.base_url(), TRACE_ROUTE_PREFIX + export.token, urls.expiry())
            return json_response(SessionTraceExportResponse(status="ready", url=url))
        return json_response(SessionTraceExportResponse(status="pending"))

    async def trace_file(self, request: Request) -> Response:
        token = request.params["token"]
        self.backend.urls.check(
            request, TRACE_ROUTE_PREFIX + token, what="trace", renew="export the trace again"
        )
        try:
            content = await trio.Path(self.traces.path_for(token)).read_bytes()
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
            project_id=project_of(session),
            checkpoints_count=count,
            status=_status(session),
            display_name=session.display_name,
            user_metadata=session.user_metadata,
            checkpoint_storage_bytes=size,
        )


def _status(session: SessionRow) -> SessionStatus:
    if session.finished_reason is None:
        return SessionStatusActive()
    reason = session.finished_reason
    if reason == EXPIRED_REASON:
        return SessionStatusCancelled(detail="expired: no heartbeat within the session timeout")
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
    if body.project_ids is not UNSET and project_of(session) not in body.project_ids:
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
    if isinstance(wanted, SearchStatusCancelled):
        return isinstance(status, SessionStatusCancelled)
    return False  # failed: never produced by this backend
