"""RestClient: sessions, training runs and checkpoints (PROTOCOL.md 3.5, 7.8, 11, A.4).

Plain request/response calls, each returning its typed Struct. Every call goes under the
transport's ``rest`` policy (`tinkex_trio._policy`: layers A and B, 408/409/429/5xx, timeouts
and connection errors for up to 5 minutes, and the billing pause), as the official SDK does;
publish/unpublish take a 409 as their answer (``rest_conflict_final``) and the archive URL has
its own rounds for a 503 (``archive_url``).

Arguments are checked before anything is sent: a malformed tinker path, an id that would
change the request path, or a negative limit raises `InvalidInputError` naming the argument.

Names: the official SDK spells the path-taking variants `*_from_tinker_path` in some places
and `*_by_tinker_path` in others. Both spellings exist here for every such method, so code
written against either reads naturally. There are no `*_async` twins: everything is async.

Pagination: the `list_*` methods return one page with its `Cursor`; `iter_training_runs()`,
`iter_user_checkpoints()`, `iter_sessions()` and `iter_search_sessions()` walk every page. They
are async generators that hold no resource between pages, so breaking out of the loop early is
fine.

Secrets: `copy_weights`' access token is sent only in the `X-Tinker-Weights-Access-Token`
header, never in a body, a log line, an error message or a repr, and never to a redirect target.
"""

from __future__ import annotations

import email.utils
import logging
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar, final

import httpx
import msgspec
import trio

from tinkex_trio._policy import ARCHIVE_URL, REST, REST_CONFLICT_FINAL
from tinkex_trio.errors import (
    APIStatusError,
    InvalidInputError,
    RequestFailedError,
    TinkexError,
    status_error_for,
)
from tinkex_trio.types import (
    SESSION_SEARCH_MAX_LIMIT,
    UNSET,
    AssignSessionProjectRequest,
    Checkpoint,
    CheckpointArchiveUrlResponse,
    CheckpointsListResponse,
    CopyWeightsRequest,
    CopyWeightsResponse,
    ExternalWeightsUrlsResponse,
    GetSamplerResponse,
    GetSessionResponse,
    ListSessionsResponse,
    ParsedTinkerPath,
    SearchOwnerUsers,
    SearchStatusClientFinished,
    ServerCapabilities,
    SessionSearchRequest,
    SessionSearchResponse,
    SessionSummary,
    SessionTraceExportResponse,
    SetCheckpointTtlRequest,
    TrainingRun,
    TrainingRunsResponse,
    WeightsInfoRequest,
    WeightsInfoResponse,
    WhoAmIResponse,
    decode,
    encode,
)
from tinkex_trio.types._bounds import MAX_TTL_SECONDS

if TYPE_CHECKING:
    from tinkex_trio._transport import Transport

__all__ = [
    "ARCHIVE_DEFAULT_EXPIRY",
    "DEFAULT_CHECKPOINTS_LIMIT",
    "DEFAULT_RUNS_LIMIT",
    "DEFAULT_SESSIONS_LIMIT",
    "MAX_SEARCH_OWNER_URNS",
    "TRACE_EXPORT_POLL_INTERVAL",
    "WEIGHTS_ACCESS_TOKEN_HEADER",
    "AccessScope",
    "RestClient",
]

_T = TypeVar("_T")

AccessScope = Literal["owned", "accessible"]
"""`owned`: what the caller created; `accessible`: also what others shared with them."""

_logger = logging.getLogger("tinkex_trio.rest")

_API_PREFIX: Final = "/api/v1"

DEFAULT_RUNS_LIMIT: Final = 20
DEFAULT_SESSIONS_LIMIT: Final = 20
DEFAULT_CHECKPOINTS_LIMIT: Final = 100

# Expiry assumed when the 302 has no parsable `Expires` header (the official SDK's default).
ARCHIVE_DEFAULT_EXPIRY: Final = timedelta(minutes=15)

# PROTOCOL.md 3.5: `trace_export` is polled at this fixed cadence until it is no longer
# `pending` (the official SDK's number; exports of long sessions take a while to build).
TRACE_EXPORT_POLL_INTERVAL: Final = 5.0
# PROTOCOL.md 7.9: at most this many owner URNs in a `{"type": "user"}` search filter.
MAX_SEARCH_OWNER_URNS: Final = 10
WEIGHTS_ACCESS_TOKEN_HEADER: Final = "X-Tinker-Weights-Access-Token"

_JSON_HEADERS: Final = {"Content-Type": "application/json"}
# Characters that would change the meaning of a URL path if an id contained them.
_FORBIDDEN_IN_ID: Final = frozenset("/?#% \t\r\n")
_CHECKPOINT_SEGMENTS: Final = ("weights", "sampler_weights", "external_weights")


@final
class RestClient:
    """Typed access to the REST endpoints of a Tinker server.

    Get one from `ServiceClient.create_rest_client()`; it shares the service's transport
    (connection pool, headers, retries, telemetry), so it lives as long as the service.
    """

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    @property
    def transport(self) -> Transport:
        """The transport this client sends through (also used by `download` to stream)."""
        return self._transport

    def __repr__(self) -> str:
        return f"RestClient(transport={self._transport!r})"

    # --- server ------------------------------------------------------------------------------

    async def get_server_capabilities(self) -> ServerCapabilities:
        """The models this server supports (`GET get_server_capabilities`)."""
        return await self._call("GET", "/get_server_capabilities", ServerCapabilities)

    # --- sessions ----------------------------------------------------------------------------

    async def list_sessions(
        self,
        limit: int = DEFAULT_SESSIONS_LIMIT,
        offset: int = 0,
        access_scope: AccessScope = "owned",
    ) -> ListSessionsResponse:
        """One page of session ids (`GET sessions`). See `iter_sessions` for all of them."""
        params = {
            "limit": _page_limit(limit),
            "offset": _offset(offset),
            "access_scope": _access_scope(access_scope),
        }
        return await self._call("GET", "/sessions", ListSessionsResponse, params=params)

    async def iter_sessions(
        self, *, page_size: int = DEFAULT_SESSIONS_LIMIT, access_scope: AccessScope = "owned"
    ) -> AsyncIterator[str]:
        """Every session id, fetching `page_size` at a time.

        The sessions listing carries no cursor, so a page shorter than `page_size` ends it.
        """
        _page_limit(page_size, "page_size")
        _access_scope(access_scope)
        offset = 0
        while True:
            page = await self.list_sessions(page_size, offset, access_scope)
            for session_id in page.sessions:
                yield session_id
            if len(page.sessions) < page_size:
                return
            offset += len(page.sessions)

    async def get_session(
        self, session_id: str, access_scope: AccessScope = "owned"
    ) -> GetSessionResponse:
        """A session's training runs and samplers (`GET sessions/{id}`)."""
        path = f"/sessions/{_path_id(session_id, 'session_id')}"
        params = {"access_scope": _access_scope(access_scope)}
        return await self._call("GET", path, GetSessionResponse, params=params)

    async def assign_session_project(self, session_id: str, project_id: str) -> None:
        """Move a session (and its runs) to a project (`PUT sessions/{id}/project`)."""
        path = f"/sessions/{_path_id(session_id, 'session_id')}/project"
        body = encode(AssignSessionProjectRequest(project_id=_non_empty(project_id, "project_id")))
        await self._call("PUT", path, None, content=body)

    async def export_session_trace(self, session_id: str) -> SessionTraceExportResponse:
        """Export a session's trace; returns once the server has it ready (status `ready`).

        `GET sessions/{id}/trace_export` is asked every `TRACE_EXPORT_POLL_INTERVAL` seconds
        while the answer is `pending` (each ask has layer-B retries of its own). Bound the
        total wait with a trio cancel scope if needed.

        Raises:
            InvalidInputError: a malformed session id (nothing is sent).
            RequestFailedError: the server reports the export `failed` (its `error` is the
                message).
            TinkexError: the server says `ready` without a `url`.
        """
        path = f"/sessions/{_path_id(session_id, 'session_id')}/trace_export"
        while True:
            answer = await self._call("GET", path, SessionTraceExportResponse)
            if answer.status == "ready":
                if not answer.url:
                    raise TinkexError(
                        f"the server reports the trace export of session {session_id!r} "
                        "ready but gives no url (PROTOCOL.md 3.5)"
                    )
                return answer
            if answer.status == "failed":
                raise RequestFailedError(
                    f"the trace export of session {session_id!r} failed: "
                    f"{answer.error or 'no error given'}",
                    category="unknown",
                )
            _logger.debug(
                "trace export of %s pending; asking again in %.0f s",
                session_id,
                TRACE_EXPORT_POLL_INTERVAL,
            )
            await trio.sleep(TRACE_EXPORT_POLL_INTERVAL)

    async def search_sessions(self, request: SessionSearchRequest) -> SessionSearchResponse:
        """One page of sessions matching `request`, newest first (`POST sessions/search`).

        Experimental on the server side (PROTOCOL.md 7.9). Pass `response.next_cursor` as the
        next request's `cursor`, or use `iter_search_sessions`.
        """
        body = encode(_search_request(request))
        return await self._call("POST", "/sessions/search", SessionSearchResponse, content=body)

    async def iter_search_sessions(
        self, request: SessionSearchRequest
    ) -> AsyncIterator[SessionSummary]:
        """Every session matching `request`, newest first, following `next_cursor`.

        Starts from `request.cursor` (usually unset); pages hold `request.limit` sessions.
        """
        _search_request(request)
        while True:
            page = await self.search_sessions(request)
            for summary in page.sessions:
                yield summary
            if page.next_cursor is None or not page.sessions:
                return
            request = msgspec.structs.replace(request, cursor=page.next_cursor)

    # --- training runs -----------------------------------------------------------------------

    async def list_training_runs(
        self,
        limit: int = DEFAULT_RUNS_LIMIT,
        offset: int = 0,
        access_scope: AccessScope = "owned",
        project_id: str | None = None,
    ) -> TrainingRunsResponse:
        """One page of training runs with its cursor (`GET training_runs`)."""
        params: dict[str, Any] = {
            "limit": _page_limit(limit),
            "offset": _offset(offset),
            "access_scope": _access_scope(access_scope),
        }
        if project_id is not None:
            params["project_id"] = _non_empty(project_id, "project_id")
        return await self._call("GET", "/training_runs", TrainingRunsResponse, params=params)

    async def iter_training_runs(
        self,
        *,
        page_size: int = DEFAULT_RUNS_LIMIT,
        access_scope: AccessScope = "owned",
        project_id: str | None = None,
    ) -> AsyncIterator[TrainingRun]:
        """Every training run, following the cursor page by page."""
        _page_limit(page_size, "page_size")
        offset: int | None = 0
        while offset is not None:
            page = await self.list_training_runs(page_size, offset, access_scope, project_id)
            for run in page.training_runs:
                yield run
            offset = _next_offset(page.cursor, offset, len(page.training_runs), page_size)

    async def get_training_run(
        self, training_run_id: str, access_scope: AccessScope = "owned"
    ) -> TrainingRun:
        """One training run (`GET training_runs/{id}`)."""
        path = f"/training_runs/{_path_id(training_run_id, 'training_run_id')}"
        params = {"access_scope": _access_scope(access_scope)}
        return await self._call("GET", path, TrainingRun, params=params)

    async def get_training_run_by_tinker_path(
        self, tinker_path: str, access_scope: AccessScope = "owned"
    ) -> TrainingRun:
        """The training run a checkpoint path belongs to."""
        parsed = _parse_tinker_path(tinker_path)
        return await self.get_training_run(parsed.training_run_id, access_scope)

    get_training_run_from_tinker_path = get_training_run_by_tinker_path

    # --- checkpoints -------------------------------------------------------------------------

    async def list_checkpoints(self, training_run_id: str) -> CheckpointsListResponse:
        """All checkpoints of one training run (`GET training_runs/{id}/checkpoints`)."""
        path = f"/training_runs/{_path_id(training_run_id, 'training_run_id')}/checkpoints"
        return await self._call("GET", path, CheckpointsListResponse)

    async def list_user_checkpoints(
        self, limit: int = DEFAULT_CHECKPOINTS_LIMIT, offset: int = 0
    ) -> CheckpointsListResponse:
        """One page of all the caller's checkpoints, newest first (`GET checkpoints`)."""
        params = {"limit": _page_limit(limit), "offset": _offset(offset)}
        return await self._call("GET", "/checkpoints", CheckpointsListResponse, params=params)

    async def iter_user_checkpoints(
        self, *, page_size: int = DEFAULT_CHECKPOINTS_LIMIT
    ) -> AsyncIterator[Checkpoint]:
        """Every checkpoint of the caller, newest first, following the cursor."""
        _page_limit(page_size, "page_size")
        offset: int | None = 0
        while offset is not None:
            page = await self.list_user_checkpoints(page_size, offset)
            for checkpoint in page.checkpoints:
                yield checkpoint
            offset = _next_offset(page.cursor, offset, len(page.checkpoints), page_size)

    async def get_weights_info_by_tinker_path(self, tinker_path: str) -> WeightsInfoResponse:
        """Base model and LoRA settings of a checkpoint (`POST weights_info`)."""
        _parse_tinker_path(tinker_path)
        body = encode(WeightsInfoRequest(tinker_path=tinker_path))
        return await self._call("POST", "/weights_info", WeightsInfoResponse, content=body)

    get_weights_info_from_tinker_path = get_weights_info_by_tinker_path

    async def delete_checkpoint(self, training_run_id: str, checkpoint_id: str) -> None:
        """Delete a checkpoint (`DELETE training_runs/{run}/checkpoints/{checkpoint_id}`)."""
        await self._call("DELETE", _checkpoint_path(training_run_id, checkpoint_id), None)

    async def delete_checkpoint_by_tinker_path(self, tinker_path: str) -> None:
        """Delete the checkpoint at `tinker_path`."""
        parsed = _parse_tinker_path(tinker_path)
        await self.delete_checkpoint(parsed.training_run_id, parsed.checkpoint_id)

    delete_checkpoint_from_tinker_path = delete_checkpoint_by_tinker_path

    async def publish_checkpoint(self, training_run_id: str, checkpoint_id: str) -> None:
        """Make a checkpoint public (`POST .../publish`).

        Raises:
            ConflictError: it is public already (not retried: a 409 here is an answer).
        """
        path = _checkpoint_path(training_run_id, checkpoint_id) + "/publish"
        await self._call("POST", path, None, conflict_is_final=True)

    async def publish_checkpoint_from_tinker_path(self, tinker_path: str) -> None:
        """Make the checkpoint at `tinker_path` public."""
        parsed = _parse_tinker_path(tinker_path)
        await self.publish_checkpoint(parsed.training_run_id, parsed.checkpoint_id)

    publish_checkpoint_by_tinker_path = publish_checkpoint_from_tinker_path

    async def unpublish_checkpoint(self, training_run_id: str, checkpoint_id: str) -> None:
        """Make a checkpoint private again (`DELETE .../publish`).

        Raises:
            ConflictError: it is private already (not retried: a 409 here is an answer).
        """
        path = _checkpoint_path(training_run_id, checkpoint_id) + "/publish"
        await self._call("DELETE", path, None, conflict_is_final=True)

    async def unpublish_checkpoint_from_tinker_path(self, tinker_path: str) -> None:
        """Make the checkpoint at `tinker_path` private again."""
        parsed = _parse_tinker_path(tinker_path)
        await self.unpublish_checkpoint(parsed.training_run_id, parsed.checkpoint_id)

    unpublish_checkpoint_by_tinker_path = unpublish_checkpoint_from_tinker_path

    async def set_checkpoint_ttl(
        self, training_run_id: str, checkpoint_id: str, ttl_seconds: int | None
    ) -> None:
        """Expire a checkpoint `ttl_seconds` from now; None removes the expiry (`PUT .../ttl`)."""
        path = _checkpoint_path(training_run_id, checkpoint_id) + "/ttl"
        body = encode(SetCheckpointTtlRequest(ttl_seconds=_ttl(ttl_seconds)))
        await self._call("PUT", path, None, content=body)

    async def set_checkpoint_ttl_from_tinker_path(
        self, tinker_path: str, ttl_seconds: int | None
    ) -> None:
        """`set_checkpoint_ttl` for the checkpoint at `tinker_path`."""
        parsed = _parse_tinker_path(tinker_path)
        await self.set_checkpoint_ttl(parsed.training_run_id, parsed.checkpoint_id, ttl_seconds)

    set_checkpoint_ttl_by_tinker_path = set_checkpoint_ttl_from_tinker_path

    async def get_external_weights_urls(self, tinker_path: str) -> ExternalWeightsUrlsResponse:
        """Signed download URLs of an `external_weights/<name>` checkpoint's files.

        `GET training_runs/{run}/checkpoints/external_weights/{name}/external_weights_urls`.
        The URLs need no Tinker headers and expire at `expires`; ask again for fresh ones.

        Raises:
            InvalidInputError: `tinker_path` is malformed or not an external_weights path.
        """
        parsed = _parse_tinker_path(tinker_path)
        if parsed.kind != "external":
            raise InvalidInputError(
                f"tinker_path must be a tinker://<run>/external_weights/<name> path, got "
                f"{tinker_path!r}; create one with TrainingClient.save_weights_external"
            )
        path = _checkpoint_path(parsed.training_run_id, parsed.checkpoint_id)
        return await self._call("GET", path + "/external_weights_urls", ExternalWeightsUrlsResponse)

    get_external_weights_urls_by_tinker_path = get_external_weights_urls
    get_external_weights_urls_from_tinker_path = get_external_weights_urls

    async def copy_weights(
        self,
        tinker_path: str,
        destination_project_id: str | None = None,
        ttl_seconds: int | None = None,
        weights_access_token: str | None = None,
    ) -> CopyWeightsResponse:
        """Copy a checkpoint into a new, untrainable training run (`POST copy_weights`).

        The copy shares storage with the source and keeps its kind (weights, sampler_weights
        or external_weights). `destination_project_id` defaults to `Config.project_id`;
        when both are None the server picks (the caller's default project).
        `weights_access_token` grants access to another account's checkpoint; it is sent only
        in the `X-Tinker-Weights-Access-Token` header.

        Error handling: layer-B retries, all with one bare-uuid4 `X-Idempotency-Key` so a
        server can tell a retry from a second copy (PROTOCOL.md 1.4). Redirects are not
        followed, so the token goes to the API origin only.

        Raises:
            InvalidInputError: a malformed path, project id, ttl or token (nothing is sent;
                the token's value is never in the message).
        """
        _parse_tinker_path(tinker_path)
        if destination_project_id is None:
            destination_project_id = self._transport.config.project_id
        else:
            _non_empty(destination_project_id, "destination_project_id")
        _ttl(ttl_seconds)
        headers = {"X-Idempotency-Key": str(uuid.uuid4())}
        if weights_access_token is not None:
            if not isinstance(weights_access_token, str) or not weights_access_token.strip():
                raise InvalidInputError(
                    "weights_access_token must be a non-empty string, or None for your own "
                    "checkpoints"
                )
            if any(c in weights_access_token for c in "\r\n\0"):
                raise InvalidInputError(
                    "weights_access_token contains a line break or NUL and cannot be sent in "
                    "a header"
                )
            headers[WEIGHTS_ACCESS_TOKEN_HEADER] = weights_access_token
        body = encode(
            CopyWeightsRequest(
                source_path=tinker_path,
                destination_project_id=UNSET
                if destination_project_id is None
                else destination_project_id,
                ttl_seconds=UNSET if ttl_seconds is None else ttl_seconds,
            )
        )
        return await self._call(
            "POST",
            "/copy_weights",
            CopyWeightsResponse,
            content=body,
            headers=headers,
            follow_redirects=False,
        )

    # --- archives (PROTOCOL.md A.4) ----------------------------------------------------------

    async def get_checkpoint_archive_url(
        self, training_run_id: str, checkpoint_id: str
    ) -> CheckpointArchiveUrlResponse:
        """A signed, expiring URL of the checkpoint's archive (a tar file).

        The server answers 302 with the URL in `Location` (the redirect is not followed) and
        503 while the archive is still being built. Under the transport's ``archive_url``
        policy 503s are retried quickly (layer A), then every 30 s, 6 rounds in all
        (PROTOCOL.md A.4.2); the last 503 is raised. No layer B (as in the official SDK).

        `expires` is timezone-aware UTC: from the `Expires` header, else now + 15 minutes.

        Raises:
            InvalidInputError: a malformed id (nothing is sent).
            APIStatusError: any answer but 302 (including a 302 without `Location`).
        """
        path = _checkpoint_path(training_run_id, checkpoint_id) + "/archive"
        response = await self._transport.request(
            "GET",
            _API_PREFIX + path,
            policy=ARCHIVE_URL,
            follow_redirects=False,
            raise_for_status=False,
        )
        if response.status_code == 302:
            return _archive_url(response)
        if response.status_code < 400:
            raise status_error_for(
                response,
                f"Error code: {response.status_code} - the checkpoint archive "
                "endpoint must answer 302 with a Location header (PROTOCOL.md A.4.2)",
            )
        raise status_error_for(response)

    async def get_checkpoint_archive_url_by_tinker_path(
        self, tinker_path: str
    ) -> CheckpointArchiveUrlResponse:
        """`get_checkpoint_archive_url` for the checkpoint at `tinker_path`."""
        parsed = _parse_tinker_path(tinker_path)
        return await self.get_checkpoint_archive_url(parsed.training_run_id, parsed.checkpoint_id)

    get_checkpoint_archive_url_from_tinker_path = get_checkpoint_archive_url_by_tinker_path

    # --- identity ----------------------------------------------------------------------------

    async def whoami(self) -> WhoAmIResponse:
        """The user (and organization) behind the credential, from JWT claims (PROTOCOL.md 3.7).

        Makes no request of its own: it reads the exchanged JWT (exchanging first if none is
        cached), or the API key itself when that is a JWT.

        Raises:
            InvalidInputError: the server is in plain API-key mode and the key is not a JWT,
                so there are no claims to read.
        """
        claims = await self._transport.auth.current_claims()
        if not claims or not isinstance(claims.get("sub"), str):
            raise InvalidInputError(
                "whoami needs a JWT: the server did not enable JWT-exchange auth "
                "(pjwt_auth_enabled) and the API key is not a JWT"
            )
        org_id = claims.get("org_id")
        email = claims.get("email")
        return WhoAmIResponse(
            user_urn=claims["sub"],
            org_urn=None if org_id is None else f"tml:organization:{org_id}",
            email=email if isinstance(email, str) else None,
        )

    # --- samplers ----------------------------------------------------------------------------

    async def get_sampler(self, sampler_id: str) -> GetSamplerResponse:
        """A sampling session's base model and weights path (`GET samplers/{id}`)."""
        path = f"/samplers/{_path_id(sampler_id, 'sampler_id')}"
        return await self._call("GET", path, GetSamplerResponse)

    # --- plumbing ----------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        type_: type[_T] | None,
        *,
        params: dict[str, Any] | None = None,
        content: bytes | None = None,
        conflict_is_final: bool = False,
        headers: dict[str, str] | None = None,
        follow_redirects: bool = True,
    ) -> _T:
        """One request under the ``rest`` policy; the body is decoded into `type_` (ignored if None).

        PROTOCOL.md 9.3 retries 409 like a transient error. Where the API uses 409 as a final
        answer (publish an already public checkpoint), `conflict_is_final` raises it at once:
        the ``rest_conflict_final`` policy has no layer A and its layer B leaves 409 out.

        `headers` are sent on every attempt as given (so a caller's idempotency key is the same
        across all retries).
        """
        if content is not None:
            headers = {**_JSON_HEADERS, **(headers or {})}
        response = await self._transport.request(
            method,
            _API_PREFIX + path,
            policy=REST_CONFLICT_FINAL if conflict_is_final else REST,
            content=content,
            params=params,
            headers=headers,
            follow_redirects=follow_redirects,
        )
        if type_ is None:
            return None  # type: ignore[return-value]
        return decode(response.content, type_)


# --- validation ------------------------------------------------------------------------------


def _parse_tinker_path(tinker_path: str) -> ParsedTinkerPath:
    try:
        parsed = ParsedTinkerPath.parse(tinker_path)
    except ValueError as exc:
        raise InvalidInputError(f"tinker_path: {exc}") from None
    _path_id(parsed.training_run_id, "tinker_path (its training run id)")
    _path_id(parsed.name, "tinker_path (its checkpoint name)")
    return parsed


def _path_id(value: str, argument: str) -> str:
    """An id that goes into a URL path verbatim (colons included, PROTOCOL.md A.4.1)."""
    if not isinstance(value, str) or not value:
        raise InvalidInputError(f"{argument} must be a non-empty string, got {value!r}")
    bad = sorted(set(value) & _FORBIDDEN_IN_ID)
    if bad or value in (".", ".."):
        raise InvalidInputError(
            f"{argument} {value!r} cannot be used in a request path (contains {bad!r} or is a "
            "dot segment); pass the id exactly as the server returned it"
        )
    return value


def _checkpoint_path(training_run_id: str, checkpoint_id: str) -> str:
    """`/training_runs/{run}/checkpoints/{segment}/{name}` (checkpoint ids contain one `/`)."""
    run = _path_id(training_run_id, "training_run_id")
    if not isinstance(checkpoint_id, str) or checkpoint_id.count("/") != 1:
        raise InvalidInputError(
            f"checkpoint_id must look like 'weights/<name>' or 'sampler_weights/<name>', "
            f"got {checkpoint_id!r}"
        )
    segment, name = checkpoint_id.split("/")
    if segment not in _CHECKPOINT_SEGMENTS:
        raise InvalidInputError(
            f"checkpoint_id must start with one of {list(_CHECKPOINT_SEGMENTS)} and a '/', "
            f"got {checkpoint_id!r}"
        )
    _path_id(name, "checkpoint_id (its name part)")
    return f"/training_runs/{run}/checkpoints/{segment}/{name}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _page_limit(limit: int, argument: str = "limit") -> int:
    if not _is_int(limit) or limit < 1:
        raise InvalidInputError(f"{argument} must be a positive integer, got {limit!r}")
    return limit


def _offset(offset: int) -> int:
    if not _is_int(offset) or offset < 0:
        raise InvalidInputError(f"offset must be an integer >= 0, got {offset!r}")
    return offset


def _access_scope(access_scope: str) -> str:
    if access_scope not in ("owned", "accessible"):
        raise InvalidInputError(
            f"access_scope must be 'owned' or 'accessible', got {access_scope!r}"
        )
    return access_scope


def _non_empty(value: str, argument: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInputError(f"{argument} must be a non-empty string, got {value!r}")
    return value


def _ttl(ttl_seconds: int | None) -> int | None:
    if ttl_seconds is not None and (
        not _is_int(ttl_seconds) or not 1 <= ttl_seconds <= MAX_TTL_SECONDS
    ):
        raise InvalidInputError(
            f"ttl_seconds must be an integer in 1..{MAX_TTL_SECONDS} (100 years, the wire "
            f"bound), or None to remove the expiry; got {ttl_seconds!r}"
        )
    return ttl_seconds


def _search_request(request: SessionSearchRequest) -> SessionSearchRequest:
    """Check a session search before sending it (PROTOCOL.md 7.9 bounds)."""
    if not isinstance(request, SessionSearchRequest):
        raise InvalidInputError(
            f"request must be a SessionSearchRequest, got {type(request).__name__}"
        )
    limit = request.limit
    if not _is_int(limit) or not 1 <= limit <= SESSION_SEARCH_MAX_LIMIT:
        raise InvalidInputError(
            f"request.limit must be an integer in 1..{SESSION_SEARCH_MAX_LIMIT}, got {limit!r}"
        )
    if isinstance(request.owner, SearchOwnerUsers) and not (
        1 <= len(request.owner.owner_urns) <= MAX_SEARCH_OWNER_URNS
    ):
        raise InvalidInputError(
            f"request.owner.owner_urns must hold 1..{MAX_SEARCH_OWNER_URNS} owner URNs, got "
            f"{len(request.owner.owner_urns)}"
        )
    if request.statuses is not UNSET:
        for status in request.statuses:
            if isinstance(status, SearchStatusClientFinished) and status.reasons == []:
                raise InvalidInputError(
                    "request.statuses: client_finished reasons must be non-empty when given "
                    "(leave them unset to match every reason)"
                )
    return request


def _next_offset(cursor: Any, offset: int, received: int, page_size: int) -> int | None:
    """Where the next page starts, or None after the last page.

    Trusts the cursor's `total_count` when there is one; a page with no items always ends the
    walk, so a server whose cursor overstates the total cannot make us loop forever.
    """
    if received == 0:
        return None
    following = offset + received
    if cursor is not None:
        return following if following < cursor.total_count else None
    return following if received >= page_size else None


def _archive_url(response: httpx.Response) -> CheckpointArchiveUrlResponse:
    location = response.headers.get("location")
    if not location:
        raise APIStatusError(
            "Error code: 302 - the checkpoint archive redirect has no Location header",
            status_code=302,
            request=response.request,
            response=response,
        )
    return CheckpointArchiveUrlResponse(url=location, expires=_parse_expires(response))


def _parse_expires(response: httpx.Response) -> datetime:
    value = response.headers.get("expires")
    if value:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            parsed = None
        if parsed is not None:
            return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
    return datetime.now(UTC) + ARCHIVE_DEFAULT_EXPIRY
